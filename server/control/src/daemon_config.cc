#include "spectrumkv/control/daemon_config.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "unique_fd.h"

namespace skv::control {
namespace {

constexpr absl::string_view kConfigFileKey = "config_file";
constexpr absl::string_view kRedacted = "<redacted>";

// ---- Value parsers. Each returns InvalidArgument with the reason only; callers add the source,
// key and value so every message names all three.

absl::Status Invalid(absl::string_view reason) { return absl::InvalidArgumentError(reason); }

absl::StatusOr<bool> ParseBool(absl::string_view text) {
  const std::string v = absl::AsciiStrToLower(text);
  if (v == "true" || v == "1" || v == "yes" || v == "on") return true;
  if (v == "false" || v == "0" || v == "no" || v == "off") return false;
  return Invalid("expected true|false|1|0|yes|no|on|off");
}

absl::StatusOr<uint64_t> ParseUnsigned(absl::string_view text, uint64_t min, uint64_t max) {
  uint64_t value = 0;
  // SimpleAtoi accepts a leading '+' and surrounding spaces; the config grammar does not.
  if (text.empty() || !absl::ascii_isdigit(static_cast<unsigned char>(text.front())) ||
      !absl::SimpleAtoi(text, &value)) {
    return Invalid("expected an unsigned integer");
  }
  if (value < min || value > max) {
    return Invalid(absl::StrCat("expected a value in [", min, ", ", max, "]"));
  }
  return value;
}

// Bytes: an integer with an optional unit, decimal (KB, MB, GB, TB) or binary (KiB, MiB, GiB,
// TiB); units are case-insensitive. Bare K/M/G are refused because they are ambiguous.
absl::StatusOr<uint64_t> ParseBytes(absl::string_view text) {
  constexpr absl::string_view kExpected =
      "expected bytes: an integer with an optional unit B, KB, MB, GB, TB, KiB, MiB, GiB or TiB";
  size_t digits = 0;
  while (digits < text.size() && absl::ascii_isdigit(static_cast<unsigned char>(text[digits]))) {
    ++digits;
  }
  if (digits == 0) return Invalid(kExpected);
  uint64_t number = 0;
  if (!absl::SimpleAtoi(text.substr(0, digits), &number)) return Invalid(kExpected);
  const std::string unit = absl::AsciiStrToLower(absl::StripAsciiWhitespace(text.substr(digits)));
  static const std::map<std::string, uint64_t, std::less<>> kUnits = {
      {"", 1},
      {"b", 1},
      {"kb", 1000},
      {"mb", 1000 * 1000},
      {"gb", uint64_t{1000} * 1000 * 1000},
      {"tb", uint64_t{1000} * 1000 * 1000 * 1000},
      {"kib", uint64_t{1} << 10},
      {"mib", uint64_t{1} << 20},
      {"gib", uint64_t{1} << 30},
      {"tib", uint64_t{1} << 40},
  };
  const auto it = kUnits.find(unit);
  if (it == kUnits.end()) return Invalid(kExpected);
  uint64_t bytes = 0;
  if (__builtin_mul_overflow(number, it->second, &bytes)) return Invalid("too large");
  return bytes;
}

absl::StatusOr<absl::Duration> ParsePositiveSeconds(absl::string_view text, double max_seconds) {
  double seconds = 0;
  if (text.empty() || !absl::SimpleAtod(text, &seconds) || !std::isfinite(seconds)) {
    return Invalid("expected a number of seconds");
  }
  if (seconds <= 0 || seconds > max_seconds) {
    return Invalid(absl::StrCat("expected seconds in (0, ", max_seconds, "]"));
  }
  return absl::Seconds(seconds);
}

absl::StatusOr<LogLevel> ParseLogLevel(absl::string_view text) {
  const std::string v = absl::AsciiStrToLower(text);
  for (LogLevel level : {LogLevel::kTrace, LogLevel::kDebug, LogLevel::kInfo, LogLevel::kWarn,
                         LogLevel::kError, LogLevel::kCritical, LogLevel::kOff}) {
    if (v == LogLevelName(level)) return level;
  }
  if (v == "warning") return LogLevel::kWarn;
  return Invalid("expected trace|debug|info|warn|error|critical|off");
}

absl::StatusOr<AllocatorKind> ParseAllocator(absl::string_view text) {
  const std::string v = absl::AsciiStrToLower(text);
  if (v == "rd") return AllocatorKind::kRd;
  if (v == "paper") return AllocatorKind::kPaper;
  return Invalid("expected paper|rd");
}

bool IsIdChar(char c) {
  return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-';
}

absl::Status CheckDaemonId(absl::string_view id) {
  if (id.empty() || id.size() > 128) return Invalid("a daemon id has 1..128 characters");
  for (char c : id) {
    if (!IsIdChar(c)) return Invalid("a daemon id uses only [A-Za-z0-9._-]");
  }
  return absl::OkStatus();
}

struct HostPort {
  std::string host;
  uint16_t port = 0;
};

// host:port or [v6]:port. Port 0 is accepted (the OS picks one; useful in tests).
absl::StatusOr<HostPort> ParseHostPort(absl::string_view text) {
  constexpr absl::string_view kExpected = "expected host:port or [ipv6]:port";
  absl::string_view host;
  absl::string_view port_text;
  if (absl::StartsWith(text, "[")) {
    const size_t close = text.find(']');
    if (close == absl::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':') {
      return Invalid(kExpected);
    }
    host = text.substr(1, close - 1);
    port_text = text.substr(close + 2);
    in6_addr v6{};
    if (inet_pton(AF_INET6, std::string(host).c_str(), &v6) != 1) {
      return Invalid("not a valid IPv6 address inside [ ]");
    }
  } else {
    const size_t colon = text.rfind(':');
    if (colon == absl::string_view::npos) return Invalid(kExpected);
    host = text.substr(0, colon);
    port_text = text.substr(colon + 1);
    if (host.empty()) return Invalid(kExpected);
    for (char c : host) {
      if (!IsIdChar(c)) return Invalid("host has characters other than [A-Za-z0-9._-]");
    }
  }
  if (port_text.empty() || port_text.size() > 5) return Invalid("expected a port 0..65535");
  for (char c : port_text) {
    if (!absl::ascii_isdigit(static_cast<unsigned char>(c))) {
      return Invalid("expected a port 0..65535");
    }
  }
  uint32_t port = 0;
  if (!absl::SimpleAtoi(port_text, &port) || port > 65535) {
    return Invalid("expected a port 0..65535");
  }
  return HostPort{std::string(host), static_cast<uint16_t>(port)};
}

absl::Status CheckHostPort(absl::string_view text) { return ParseHostPort(text).status(); }

absl::Status CheckGrpcAddress(absl::string_view text) {
  if (absl::StartsWith(text, "unix:")) {
    if (text.size() == 5) return Invalid("unix: needs a socket path");
    return absl::OkStatus();
  }
  return CheckHostPort(text);
}

absl::StatusOr<std::vector<PeerConfig>> ParsePeers(absl::string_view text) {
  std::vector<PeerConfig> peers;
  for (absl::string_view item :
       absl::StrSplit(text, absl::ByAnyChar(", \t"), absl::SkipWhitespace())) {
    const size_t eq = item.find('=');
    if (eq == absl::string_view::npos) {
      return Invalid(absl::StrCat("peer '", item, "' is not id=host:port"));
    }
    PeerConfig peer{std::string(item.substr(0, eq)), std::string(item.substr(eq + 1))};
    if (absl::Status s = CheckDaemonId(peer.daemon_id); !s.ok()) {
      return Invalid(absl::StrCat("peer '", item, "': ", s.message()));
    }
    if (absl::Status s = CheckHostPort(peer.address); !s.ok()) {
      return Invalid(absl::StrCat("peer '", item, "': ", s.message()));
    }
    peers.push_back(std::move(peer));
  }
  return peers;
}

std::string FormatPeers(const std::vector<PeerConfig>& peers) {
  return absl::StrJoin(peers, ",", [](std::string* out, const PeerConfig& p) {
    absl::StrAppend(out, p.daemon_id, "=", p.address);
  });
}

std::string FormatBool(bool v) { return v ? "true" : "false"; }

// ---- The key table: the only place a key is named.

struct ConfigKey {
  absl::string_view name;
  absl::string_view doc;
  bool secret = false;
  bool boolean = false;  // a bare --flag means true
  std::function<absl::Status(DaemonConfig&, absl::string_view)> set;
  std::function<std::string(const DaemonConfig&)> get;
};

template <typename T, typename Parse>
std::function<absl::Status(DaemonConfig&, absl::string_view)> Setter(T DaemonConfig::*member,
                                                                     Parse parse) {
  return [member, parse](DaemonConfig& c, absl::string_view v) -> absl::Status {
    auto parsed = parse(v);
    if (!parsed.ok()) return parsed.status();
    c.*member = *std::move(parsed);
    return absl::OkStatus();
  };
}

// Parses a value and stores it into the default codec policy with `store(policy, value)`.
template <typename Parse, typename Store>
std::function<absl::Status(DaemonConfig&, absl::string_view)> PolicySetter(Parse parse,
                                                                           Store store) {
  return [parse, store](DaemonConfig& c, absl::string_view v) -> absl::Status {
    auto parsed = parse(v);
    if (!parsed.ok()) return parsed.status();
    CodecOptions candidate = c.default_codec_policy;
    store(candidate, *std::move(parsed));
    if (absl::Status s = ValidateCodecPolicy(candidate, "codec"); !s.ok()) return s;
    c.default_codec_policy = candidate;
    return absl::OkStatus();
  };
}

auto AllowTierSetter(Tier tier) {
  return PolicySetter(ParseBool, [tier](CodecOptions& o, bool v) {
    o.allowed_tiers = o.allowed_tiers.With(tier, v);
  });
}
auto AllowTierGetter(Tier tier) {
  return [tier](const DaemonConfig& c) {
    return FormatBool(c.default_codec_policy.allowed_tiers.Has(tier));
  };
}

auto StringWith(absl::Status (*check)(absl::string_view)) {
  return [check](absl::string_view v) -> absl::StatusOr<std::string> {
    if (check != nullptr) {
      if (absl::Status s = check(v); !s.ok()) return s;
    }
    return std::string(v);
  };
}

auto Uint32In(uint32_t min, uint32_t max) {
  return [min, max](absl::string_view v) -> absl::StatusOr<uint32_t> {
    auto n = ParseUnsigned(v, min, max);
    if (!n.ok()) return n.status();
    return static_cast<uint32_t>(*n);
  };
}

auto BytesAtLeast(uint64_t min) {
  return [min](absl::string_view v) -> absl::StatusOr<uint64_t> {
    auto bytes = ParseBytes(v);
    if (bytes.ok() && *bytes < min) return Invalid(absl::StrCat("must be at least ", min, " B"));
    return bytes;
  };
}

absl::Status CheckMetricsAddress(absl::string_view v) {
  return v.empty() ? absl::OkStatus() : CheckHostPort(v);
}
absl::Status CheckOptionalDaemonId(absl::string_view v) {
  return v.empty() ? absl::OkStatus() : CheckDaemonId(v);
}

const std::vector<ConfigKey>& Keys() {
  static const std::vector<ConfigKey>* const keys = new std::vector<ConfigKey>{
      {"grpc_listen_address", "gRPC API listen address: host:port, [ipv6]:port or unix:/path.",
       false, false, Setter(&DaemonConfig::grpc_listen_address, StringWith(&CheckGrpcAddress)),
       [](const DaemonConfig& c) { return c.grpc_listen_address; }},
      {"metrics_listen_address",
       "Prometheus /metrics listen address host:port; empty disables the exporter.", false, false,
       Setter(&DaemonConfig::metrics_listen_address, StringWith(&CheckMetricsAddress)),
       [](const DaemonConfig& c) { return c.metrics_listen_address; }},
      {"data_listen_address",
       "UCX data-plane listen address host:port (where peers send segments).", false, false,
       Setter(&DaemonConfig::data_listen_address, StringWith(&CheckHostPort)),
       [](const DaemonConfig& c) { return c.data_listen_address; }},
      {"daemon_id", "This daemon's id, [A-Za-z0-9._-]{1,128}; empty = the host name.", false, false,
       Setter(&DaemonConfig::daemon_id, StringWith(&CheckOptionalDaemonId)),
       [](const DaemonConfig& c) { return c.daemon_id; }},
      {"auth_token",
       "Shared secret for peer authentication; required unless data_listen_address is loopback.",
       true, false, Setter(&DaemonConfig::auth_token, StringWith(nullptr)),
       [](const DaemonConfig& c) { return c.auth_token; }},
      {"auth_token_file", "File holding the peer token (whitespace trimmed); excludes auth_token.",
       false, false, Setter(&DaemonConfig::auth_token_file, StringWith(nullptr)),
       [](const DaemonConfig& c) { return c.auth_token_file; }},
      {"peers", "Peer daemons: comma-separated id=host:port (their data_listen_address).", false,
       false, Setter(&DaemonConfig::peers, ParsePeers),
       [](const DaemonConfig& c) { return FormatPeers(c.peers); }},
      {"data_allowed_sources",
       "Networks allowed to connect to the data plane: comma-separated CIDRs or addresses "
       "(10.0.0.0/8,fd00::/8); empty = any host that reaches it.",
       false, false,
       Setter(&DaemonConfig::data_allowed_sources,
              [](absl::string_view v) -> absl::StatusOr<std::vector<std::string>> {
                return absl::StrSplit(v, absl::ByAnyChar(", \t"), absl::SkipWhitespace());
              }),
       [](const DaemonConfig& c) { return absl::StrJoin(c.data_allowed_sources, ","); }},
      {"tls_cert_file", "PEM server certificate for gRPC TLS (with tls_key_file).", false, false,
       Setter(&DaemonConfig::tls_cert_file, StringWith(nullptr)),
       [](const DaemonConfig& c) { return c.tls_cert_file; }},
      {"tls_key_file", "PEM private key for gRPC TLS (with tls_cert_file).", false, false,
       Setter(&DaemonConfig::tls_key_file, StringWith(nullptr)),
       [](const DaemonConfig& c) { return c.tls_key_file; }},
      {"tls_ca_file", "PEM CA bundle that client certificates must chain to (mutual TLS).", false,
       false, Setter(&DaemonConfig::tls_ca_file, StringWith(nullptr)),
       [](const DaemonConfig& c) { return c.tls_ca_file; }},
      {"tls_require_client_cert", "Require and verify client certificates (mutual TLS).", false,
       true, Setter(&DaemonConfig::tls_require_client_cert, ParseBool),
       [](const DaemonConfig& c) { return FormatBool(c.tls_require_client_cert); }},
      {"allow_insecure_grpc",
       "Serve gRPC without TLS on a non-loopback address (refused otherwise); logged loudly.",
       false, true, Setter(&DaemonConfig::allow_insecure_grpc, ParseBool),
       [](const DaemonConfig& c) { return FormatBool(c.allow_insecure_grpc); }},
      {"max_inflight_bytes",
       "Bytes of encoded segments held at once across transfers, e.g. 1GiB; >= 1MiB.", false, false,
       Setter(&DaemonConfig::max_inflight_bytes, BytesAtLeast(uint64_t{1} << 20)),
       [](const DaemonConfig& c) { return absl::StrCat(c.max_inflight_bytes); }},
      {"max_profile_bytes",
       "Bytes of model profiles held over all registered models, e.g. 256MiB; >= 1MiB.", false,
       false, Setter(&DaemonConfig::max_profile_bytes, BytesAtLeast(uint64_t{1} << 20)),
       [](const DaemonConfig& c) { return absl::StrCat(c.max_profile_bytes); }},
      {"early_segment_buffer_bytes",
       "Bytes of segments buffered before their Receive arrives, e.g. 256MiB; >= 1MiB.", false,
       false, Setter(&DaemonConfig::early_segment_buffer_bytes, BytesAtLeast(uint64_t{1} << 20)),
       [](const DaemonConfig& c) { return absl::StrCat(c.early_segment_buffer_bytes); }},
      {"shutdown_grace_seconds",
       "On SIGTERM, seconds in-flight transfers get to finish before they are cut, (0, 3600].",
       false, false,
       Setter(&DaemonConfig::shutdown_grace,
              [](absl::string_view v) { return ParsePositiveSeconds(v, 3600); }),
       [](const DaemonConfig& c) { return absl::StrCat(absl::ToDoubleSeconds(c.shutdown_grace)); }},
      {"early_segment_ttl_seconds", "Seconds an early segment waits for its Receive, (0, 3600].",
       false, false,
       Setter(&DaemonConfig::early_segment_ttl,
              [](absl::string_view v) { return ParsePositiveSeconds(v, 3600); }),
       [](const DaemonConfig& c) {
         return absl::StrCat(absl::ToDoubleSeconds(c.early_segment_ttl));
       }},
      {"max_concurrent_transfers", "Send + Receive calls served at once, 1..65536.", false, false,
       Setter(&DaemonConfig::max_concurrent_transfers, Uint32In(1, 65536)),
       [](const DaemonConfig& c) { return absl::StrCat(c.max_concurrent_transfers); }},
      {"shm_mapping_cache_entries",
       "Shared-memory KV objects kept mapped between transfers, 0..4096; 0 = map every time.",
       false, false, Setter(&DaemonConfig::shm_mapping_cache_entries, Uint32In(0, 4096)),
       [](const DaemonConfig& c) { return absl::StrCat(c.shm_mapping_cache_entries); }},
      {"cuda_ipc_cache_entries",
       "Idle CUDA IPC handles kept open between transfers, 0..4096; 0 = close a handle when no "
       "transfer uses it. An open handle keeps its allocation mapped in the daemon.",
       false, false, Setter(&DaemonConfig::cuda_ipc_cache_entries, Uint32In(0, 4096)),
       [](const DaemonConfig& c) { return absl::StrCat(c.cuda_ipc_cache_entries); }},
      {"codec_threads",
       "Threads one transfer encodes (sender) or decodes (receiver) on, 0..64; 0 = half the "
       "hardware threads, 1..4.",
       false, false, Setter(&DaemonConfig::codec_threads, Uint32In(0, 64)),
       [](const DaemonConfig& c) { return absl::StrCat(c.codec_threads); }},
      {"codec_allocator", "Default tier allocator: paper|rd.", false, false,
       PolicySetter(ParseAllocator, [](CodecOptions& o, AllocatorKind v) { o.allocator = v; }),
       [](const DaemonConfig& c) { return AllocatorName(c.default_codec_policy.allocator); }},
      {"codec_rotate", "Default: Hadamard-rotate K and V before quantising.", false, true,
       PolicySetter(ParseBool,
                    [](CodecOptions& o, bool v) { o.rotate_keys = o.rotate_values = v; }),
       [](const DaemonConfig& c) { return FormatBool(c.default_codec_policy.rotate_keys); }},
      {"codec_centre", "Default: subtract the per-channel key mean before quantising.", false, true,
       PolicySetter(ParseBool, [](CodecOptions& o, bool v) { o.centre_keys = v; }),
       [](const DaemonConfig& c) { return FormatBool(c.default_codec_policy.centre_keys); }},
      {"codec_per_channel_keys", "Default: per-channel key scales (KIVI-style).", false, true,
       PolicySetter(ParseBool, [](CodecOptions& o, bool v) { o.per_channel_keys = v; }),
       [](const DaemonConfig& c) { return FormatBool(c.default_codec_policy.per_channel_keys); }},
      {"codec_group_size", "Default channels per quantisation group: 0 (= head_dim), 32 or 64.",
       false, false,
       PolicySetter(Uint32In(0, 256), [](CodecOptions& o, uint32_t v) { o.group_size = v; }),
       [](const DaemonConfig& c) { return absl::StrCat(c.default_codec_policy.group_size); }},
      {"codec_allow_int4", "Default: allow the INT4 tier (still subject to the model's probe).",
       false, true, AllowTierSetter(Tier::kInt4), AllowTierGetter(Tier::kInt4)},
      {"codec_allow_int2", "Default: allow the INT2 tier.", false, true,
       AllowTierSetter(Tier::kInt2), AllowTierGetter(Tier::kInt2)},
      {"codec_sink_tokens", "Default: first tokens always kept at FP16, 0..4096.", false, false,
       PolicySetter(Uint32In(0, kMaxSinkTokens),
                    [](CodecOptions& o, uint32_t v) { o.sink_tokens = v; }),
       [](const DaemonConfig& c) { return absl::StrCat(c.default_codec_policy.sink_tokens); }},
      {"codec_recent_tokens", "Default: last tokens always kept at FP16, 0..1048576.", false, false,
       PolicySetter(Uint32In(0, kMaxRecentTokens),
                    [](CodecOptions& o, uint32_t v) { o.recent_tokens = v; }),
       [](const DaemonConfig& c) { return absl::StrCat(c.default_codec_policy.recent_tokens); }},
      {"codec_allow_drop",
       "Default: the codec may drop the least important tokens when even the cheapest tier does "
       "not fit; false keeps every token (for engines that cannot mask dropped tokens).",
       false, true, PolicySetter(ParseBool, [](CodecOptions& o, bool v) { o.allow_drop = v; }),
       [](const DaemonConfig& c) { return FormatBool(c.default_codec_policy.allow_drop); }},
      {"codec_entropy_coding",
       "Default: zstd-code each segment when that makes it smaller (lossless; saves bytes on top "
       "of the budget at the cost of sender CPU).",
       false, true,
       PolicySetter(ParseBool,
                    [](CodecOptions& o, bool v) {
                      o.entropy_coder = v ? EntropyCoder::kZstd : EntropyCoder::kNone;
                    }),
       [](const DaemonConfig& c) {
         return FormatBool(c.default_codec_policy.entropy_coder == EntropyCoder::kZstd);
       }},
      {"codec_transform_coding",
       "Default: code quantized rows in the model's profile basis (CodecPolicy.transform_coding); "
       "then every model must be registered with a profile.",
       false, true,
       PolicySetter(ParseBool, [](CodecOptions& o, bool v) { o.transform_coding = v; }),
       [](const DaemonConfig& c) { return FormatBool(c.default_codec_policy.transform_coding); }},
      {"log_level", "trace|debug|info|warn|error|critical|off.", false, false,
       Setter(&DaemonConfig::log_level, ParseLogLevel),
       [](const DaemonConfig& c) { return std::string(LogLevelName(c.log_level)); }},
      {"ucx_tls", "UCX transports (UCX_TLS), e.g. tcp or rc,tcp; empty = tcp.", false, false,
       Setter(&DaemonConfig::ucx_tls, StringWith(nullptr)),
       [](const DaemonConfig& c) { return c.ucx_tls; }},
      {"ucx_net_devices",
       "UCX network devices (UCX_NET_DEVICES), e.g. eth0; empty = lo on loopback, else UCX's "
       "choice.",
       false, false, Setter(&DaemonConfig::ucx_net_devices, StringWith(nullptr)),
       [](const DaemonConfig& c) { return c.ucx_net_devices; }},
  };
  return *keys;
}

const ConfigKey* FindKey(absl::string_view name) {
  for (const ConfigKey& key : Keys()) {
    if (key.name == name) return &key;
  }
  return nullptr;
}

std::string ShownValue(const ConfigKey& key, absl::string_view value) {
  return key.secret ? std::string(kRedacted) : std::string(value);
}

// "<source>: key 'k': invalid value 'v': <reason>"
absl::Status ApplyFromSource(const ConfigKey& key, absl::string_view value,
                             absl::string_view source, DaemonConfig& config) {
  absl::Status s = key.set(config, value);
  if (s.ok()) return s;
  return absl::InvalidArgumentError(absl::StrCat(source, ": key '", key.name, "': invalid value '",
                                                 ShownValue(key, value), "': ", s.message()));
}

// Config and token files are small; the cap keeps a wrong path (a device, a huge log) harmless.
constexpr size_t kMaxConfigFileBytes = 1 << 20;

absl::StatusOr<std::string> ReadWholeFile(const std::string& path, absl::string_view key) {
  const UniqueFd file(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  const int fd = file.get();
  if (!file.valid()) {
    const int err = errno;
    if (err == ENOENT) {
      return absl::NotFoundError(absl::StrCat(key, ": file '", path, "' not found"));
    }
    return absl::InvalidArgumentError(
        absl::StrCat(key, ": cannot open file '", path, "': ", std::strerror(err)));
  }
  struct stat info {};
  if (::fstat(fd, &info) != 0 || !S_ISREG(info.st_mode)) {
    return absl::InvalidArgumentError(absl::StrCat(key, ": '", path, "' is not a regular file"));
  }
  if (static_cast<uint64_t>(info.st_size) > kMaxConfigFileBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(key, ": file '", path, "' is larger than ", kMaxConfigFileBytes, " bytes"));
  }
  std::string text(static_cast<size_t>(info.st_size), '\0');
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::read(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(key, ": cannot read file '", path, "': ", std::strerror(errno)));
    }
    if (n == 0) break;  // the file shrank while reading
    done += static_cast<size_t>(n);
  }
  text.resize(done);
  return text;
}

std::string NormalizeFlagName(absl::string_view name) {
  std::string out(name);
  for (char& c : out) {
    if (c == '-') c = '_';
  }
  return out;
}

struct ParsedFlag {
  std::string key;
  std::optional<std::string> value;  // nullopt for a bare --flag
  std::string text;                  // as given, for messages
};

absl::StatusOr<std::vector<ParsedFlag>> ParseFlags(std::span<const std::string> args) {
  std::vector<ParsedFlag> flags;
  for (const std::string& arg : args) {
    if (arg == "--help" || arg == "-h") continue;
    if (!absl::StartsWith(arg, "--") || arg.size() == 2) {
      return absl::InvalidArgumentError(
          absl::StrCat("unexpected argument '", arg, "': flags are --key=value (see --help)"));
    }
    const absl::string_view body = absl::string_view(arg).substr(2);
    const size_t eq = body.find('=');
    ParsedFlag flag;
    flag.key = NormalizeFlagName(body.substr(0, eq));
    if (eq != absl::string_view::npos) flag.value = std::string(body.substr(eq + 1));
    flag.text = std::string(arg);
    flags.push_back(std::move(flag));
  }
  return flags;
}

std::string HostName() {
  char name[HOST_NAME_MAX + 1] = {};
  if (gethostname(name, sizeof(name) - 1) != 0 || name[0] == '\0') return "spectrumkvd";
  std::string id;
  for (const char* p = name; *p != '\0'; ++p) id.push_back(IsIdChar(*p) ? *p : '-');
  return id.substr(0, 128);
}

}  // namespace

absl::string_view LogLevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kTrace:
      return "trace";
    case LogLevel::kDebug:
      return "debug";
    case LogLevel::kInfo:
      return "info";
    case LogLevel::kWarn:
      return "warn";
    case LogLevel::kError:
      return "error";
    case LogLevel::kCritical:
      return "critical";
    case LogLevel::kOff:
      return "off";
  }
  return "info";
}

EnvironmentLookup ProcessEnvironment() {
  return [](const std::string& name) -> std::optional<std::string> {
    const char* value = std::getenv(name.c_str());
    if (value == nullptr) return std::nullopt;
    return std::string(value);
  };
}

std::string EnvironmentVariableForKey(absl::string_view key) {
  return absl::StrCat("SKV_", absl::AsciiStrToUpper(key));
}

std::vector<DaemonConfigKeyInfo> DaemonConfigKeys() {
  std::vector<DaemonConfigKeyInfo> out;
  out.push_back({kConfigFileKey, "Config file of key = value lines; absent = defaults.", false});
  for (const ConfigKey& key : Keys()) out.push_back({key.name, key.doc, key.secret});
  return out;
}

bool IsLoopbackAddress(absl::string_view address) {
  if (absl::StartsWith(address, "unix:")) return true;
  auto host_port = ParseHostPort(address);
  if (!host_port.ok()) return false;
  const std::string& host = host_port->host;
  if (absl::EqualsIgnoreCase(host, "localhost")) return true;
  in_addr v4{};
  if (inet_pton(AF_INET, host.c_str(), &v4) == 1) {
    return (ntohl(v4.s_addr) >> 24) == 127;
  }
  in6_addr v6{};
  if (inet_pton(AF_INET6, host.c_str(), &v6) == 1) {
    return IN6_IS_ADDR_LOOPBACK(&v6);
  }
  return false;
}

absl::Status SetDaemonConfigKey(absl::string_view key, absl::string_view value,
                                DaemonConfig& config) {
  const ConfigKey* entry = FindKey(key);
  if (entry == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("unknown key '", key, "'"));
  }
  return ApplyFromSource(*entry, value, "config", config);
}

absl::Status ApplyConfigFileText(absl::string_view text, absl::string_view source_name,
                                 DaemonConfig& config) {
  std::map<std::string, int, std::less<>> seen_at_line;
  int line_number = 0;
  for (absl::string_view raw_line : absl::StrSplit(text, '\n')) {
    ++line_number;
    const std::string where = absl::StrCat(source_name, ":", line_number);
    const absl::string_view line = absl::StripAsciiWhitespace(raw_line);
    if (line.empty() || line.front() == '#') continue;
    const size_t eq = line.find('=');
    if (eq == absl::string_view::npos) {
      // The line is not echoed: it may hold a secret.
      return absl::InvalidArgumentError(absl::StrCat(where, ": expected 'key = value'"));
    }
    const absl::string_view key = absl::StripAsciiWhitespace(line.substr(0, eq));
    absl::string_view value = absl::StripAsciiWhitespace(line.substr(eq + 1));
    if (value.size() >= 2 && value.front() == '"' && value.back() == '"') {
      value = value.substr(1, value.size() - 2);
    }
    if (key == kConfigFileKey) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": key '", key, "' cannot be set inside a config file"));
    }
    const ConfigKey* entry = FindKey(key);
    if (entry == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": unknown key '", key, "'"));
    }
    if (auto it = seen_at_line.find(key); it != seen_at_line.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": key '", key, "' repeats the one on line ", it->second));
    }
    seen_at_line.emplace(std::string(key), line_number);
    if (absl::Status s = ApplyFromSource(*entry, value, where, config); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status ValidateDaemonConfig(const DaemonConfig& c) {
  auto field_error = [](absl::string_view key, absl::string_view reason) {
    return absl::InvalidArgumentError(absl::StrCat(key, ": ", reason));
  };
  if (absl::Status s = CheckGrpcAddress(c.grpc_listen_address); !s.ok()) {
    return field_error("grpc_listen_address", s.message());
  }
  if (absl::Status s = CheckMetricsAddress(c.metrics_listen_address); !s.ok()) {
    return field_error("metrics_listen_address", s.message());
  }
  if (absl::Status s = CheckHostPort(c.data_listen_address); !s.ok()) {
    return field_error("data_listen_address", s.message());
  }
  // Two listeners on one fixed port would fail at bind time with a less helpful message.
  const std::pair<absl::string_view, const std::string*> listeners[] = {
      {"grpc_listen_address", &c.grpc_listen_address},
      {"metrics_listen_address", &c.metrics_listen_address},
      {"data_listen_address", &c.data_listen_address}};
  for (size_t i = 0; i < std::size(listeners); ++i) {
    for (size_t j = i + 1; j < std::size(listeners); ++j) {
      const std::string& a = *listeners[i].second;
      if (!a.empty() && a == *listeners[j].second && !absl::EndsWith(a, ":0")) {
        return field_error(listeners[j].first,
                           absl::StrCat("'", a, "' is already used by ", listeners[i].first));
      }
    }
  }
  if (absl::Status s = CheckDaemonId(c.daemon_id); !s.ok()) {
    return field_error("daemon_id", s.message());
  }
  if ((c.auth_token.empty() || c.auth_token == kLoopbackOnlyToken) &&
      !IsLoopbackAddress(c.data_listen_address)) {
    return field_error("auth_token",
                       absl::StrCat("a token of your own is required because data_listen_address '",
                                    c.data_listen_address, "' is not a loopback address"));
  }
  std::set<std::string, std::less<>> peer_ids;
  std::set<std::string, std::less<>> peer_addresses;
  for (const PeerConfig& peer : c.peers) {
    if (absl::Status s = CheckDaemonId(peer.daemon_id); !s.ok()) {
      return field_error("peers", absl::StrCat("'", peer.daemon_id, "': ", s.message()));
    }
    if (absl::Status s = CheckHostPort(peer.address); !s.ok()) {
      return field_error("peers",
                         absl::StrCat("'", peer.daemon_id, "=", peer.address, "': ", s.message()));
    }
    if (!peer_ids.insert(peer.daemon_id).second) {
      return field_error("peers", absl::StrCat("daemon id '", peer.daemon_id, "' is listed twice"));
    }
    if (!peer_addresses.insert(peer.address).second) {
      return field_error("peers", absl::StrCat("address '", peer.address, "' is listed twice"));
    }
  }
  if (c.tls_cert_file.empty() != c.tls_key_file.empty()) {
    return field_error(c.tls_cert_file.empty() ? "tls_cert_file" : "tls_key_file",
                       "tls_cert_file and tls_key_file must be set together");
  }
  if (c.tls_require_client_cert && (c.tls_ca_file.empty() || c.tls_cert_file.empty())) {
    return field_error("tls_require_client_cert",
                       "mutual TLS needs tls_ca_file, tls_cert_file and tls_key_file");
  }
  if (!c.tls_ca_file.empty() && !c.tls_require_client_cert) {
    return field_error("tls_ca_file",
                       "a client CA without tls_require_client_cert=true verifies no client: set "
                       "tls_require_client_cert=true for mutual TLS, or drop tls_ca_file");
  }
  if (c.tls_cert_file.empty() && !c.allow_insecure_grpc &&
      !IsLoopbackAddress(c.grpc_listen_address)) {
    return field_error(
        "grpc_listen_address",
        absl::StrCat("'", c.grpc_listen_address,
                     "' is not loopback and TLS is off: set tls_cert_file and "
                     "tls_key_file, or allow_insecure_grpc=true where the network is "
                     "already closed to others"));
  }
  if (c.max_inflight_bytes < (uint64_t{1} << 20)) {
    return field_error("max_inflight_bytes", "must be at least 1MiB");
  }
  if (c.max_profile_bytes < (uint64_t{1} << 20)) {
    return field_error("max_profile_bytes", "must be at least 1MiB");
  }
  if (c.early_segment_buffer_bytes < (uint64_t{1} << 20)) {
    return field_error("early_segment_buffer_bytes", "must be at least 1MiB");
  }
  if (c.early_segment_ttl <= absl::ZeroDuration() || c.early_segment_ttl > absl::Hours(1)) {
    return field_error("early_segment_ttl_seconds", "must be in (0, 3600]");
  }
  if (c.max_concurrent_transfers == 0 || c.max_concurrent_transfers > 65536) {
    return field_error("max_concurrent_transfers", "must be in [1, 65536]");
  }
  return ValidateCodecPolicy(c.default_codec_policy, "codec");
}

absl::StatusOr<DaemonConfig> LoadDaemonConfig(std::span<const std::string> args,
                                              const EnvironmentLookup& env) {
  auto flags = ParseFlags(args);
  if (!flags.ok()) return flags.status();

  DaemonConfig config;

  // The file's name comes from the two higher-precedence sources: flag, then environment.
  std::optional<std::string> config_file;
  std::string config_file_source;
  const std::string config_file_env = EnvironmentVariableForKey(kConfigFileKey);
  if (std::optional<std::string> from_env = env(config_file_env)) {
    config_file = std::move(from_env);
    config_file_source = absl::StrCat("environment ", config_file_env);
  }
  for (const ParsedFlag& flag : *flags) {
    if (flag.key != kConfigFileKey) continue;
    if (!flag.value.has_value()) {
      return absl::InvalidArgumentError(
          absl::StrCat("flag ", flag.text, ": needs a value (--config_file=PATH)"));
    }
    config_file = flag.value;
    config_file_source = absl::StrCat("flag --", kConfigFileKey);
  }
  if (config_file.has_value()) {
    if (config_file->empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(config_file_source, ": key 'config_file': empty path"));
    }
    auto text = ReadWholeFile(*config_file, "config_file");
    if (!text.ok()) return text.status();
    if (absl::Status s = ApplyConfigFileText(*text, *config_file, config); !s.ok()) return s;
    config.config_file = *config_file;
  }

  for (const ConfigKey& key : Keys()) {
    const std::string name = EnvironmentVariableForKey(key.name);
    if (std::optional<std::string> value = env(name)) {
      if (absl::Status s = ApplyFromSource(key, *value, absl::StrCat("environment ", name), config);
          !s.ok()) {
        return s;
      }
    }
  }

  for (const ParsedFlag& flag : *flags) {
    if (flag.key == kConfigFileKey) continue;
    const ConfigKey* key = FindKey(flag.key);
    if (key == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown flag '", flag.text, "' (see --help)"));
    }
    std::string value;
    if (flag.value.has_value()) {
      value = *flag.value;
    } else if (key->boolean) {
      value = "true";
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("flag --", key->name, ": needs a value (--", key->name, "=VALUE)"));
    }
    if (absl::Status s = ApplyFromSource(*key, value, absl::StrCat("flag --", key->name), config);
        !s.ok()) {
      return s;
    }
  }

  if (!config.auth_token_file.empty()) {
    if (!config.auth_token.empty()) {
      return absl::InvalidArgumentError(
          "auth_token_file: cannot be combined with auth_token; set one of them");
    }
    auto token = ReadWholeFile(config.auth_token_file, "auth_token_file");
    if (!token.ok()) return token.status();
    config.auth_token = std::string(absl::StripAsciiWhitespace(*token));
    if (config.auth_token.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("auth_token_file: file '", config.auth_token_file, "' holds no token"));
    }
  }
  if (config.daemon_id.empty()) config.daemon_id = HostName();

  if (absl::Status s = ValidateDaemonConfig(config); !s.ok()) return s;
  return config;
}

absl::StatusOr<DaemonConfig> LoadDaemonConfig(int argc, const char* const* argv) {
  std::vector<std::string> args;
  for (int i = 1; i < argc; ++i) args.emplace_back(argv[i]);
  return LoadDaemonConfig(args, ProcessEnvironment());
}

bool HelpRequested(std::span<const std::string> args) {
  for (const std::string& arg : args) {
    if (arg == "--help" || arg == "-h") return true;
  }
  return false;
}

std::string DaemonConfigUsage(absl::string_view program_name) {
  const DaemonConfig defaults;
  std::string out = absl::StrCat(
      "Usage: ", program_name, " [--key=value ...]\n\n",
      "Every key can be set, in increasing precedence, in the config file (key = value),\n"
      "in the environment (SKV_<KEY>) or as a flag (--key=value; '-' and '_' are alike).\n\n");
  absl::StrAppend(&out, "  --", kConfigFileKey, "=PATH  [env ",
                  EnvironmentVariableForKey(kConfigFileKey), "]\n      ",
                  "Config file of key = value lines ('#' starts a comment line); absent = "
                  "defaults.\n");
  for (const ConfigKey& key : Keys()) {
    const std::string default_value = key.get(defaults);
    absl::StrAppend(&out, "  --", key.name, "=", key.boolean ? "BOOL" : "VALUE", "  [env ",
                    EnvironmentVariableForKey(key.name), "; default ",
                    default_value.empty() ? "empty" : absl::StrCat("'", default_value, "'"),
                    "]\n      ", key.doc, "\n");
  }
  absl::StrAppend(&out, "  --help, -h\n      Print this text.\n");
  return out;
}

std::string FormatDaemonConfig(const DaemonConfig& config) {
  std::string out;
  for (const ConfigKey& key : Keys()) {
    std::string value = key.get(config);
    if (key.secret && !value.empty()) value = std::string(kRedacted);
    // Quoting keeps empty values and values with edge whitespace round-trippable.
    absl::StrAppend(&out, key.name, " = \"", value, "\"\n");
  }
  return out;
}

}  // namespace skv::control
