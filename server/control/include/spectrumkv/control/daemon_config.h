// The one configuration struct of spectrumkvd and how it is filled.
//
// Sources, in increasing precedence: built-in defaults < config file < environment (SKV_<KEY>) <
// command-line flags (--key=value). Every key is listed once in a table in daemon_config.cc from
// which the file keys, the environment names, the flags and the --help text all derive.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "spectrumkv/control/codec_policy.h"

namespace skv::control {

enum class LogLevel : uint8_t { kTrace, kDebug, kInfo, kWarn, kError, kCritical, kOff };

// A peer daemon this daemon may send to.
struct PeerConfig {
  std::string daemon_id;  // the peer's own daemon_id
  std::string address;    // the peer's data-plane address (its data_listen_address), host:port

  bool operator==(const PeerConfig&) const = default;
};

struct DaemonConfig {
  // ---- Listening addresses. Loopback by default: nothing is reachable from outside unless asked.
  // gRPC API: host:port, [v6]:port or unix:/path.
  std::string grpc_listen_address = "127.0.0.1:50551";
  // Prometheus /metrics over HTTP: host:port; empty disables the exporter.
  std::string metrics_listen_address = "127.0.0.1:9464";
  // UCX data plane (segments from peer daemons): host:port.
  std::string data_listen_address = "127.0.0.1:50552";

  // ---- Identity and peers.
  // This daemon's id in the peer handshake and in peers lists; [A-Za-z0-9._-], 1..128 chars.
  // Empty in every source = the host name.
  std::string daemon_id;
  // Shared secret peers present in the handshake. Empty = no peer authentication, which is allowed
  // only while data_listen_address is a loopback address. Never printed.
  std::string auth_token;
  // File holding the token (surrounding whitespace trimmed); read at load time and then stored in
  // auth_token. Mutually exclusive with auth_token.
  std::string auth_token_file;
  // Daemons this one may send to; Send's peer must name one of them.
  std::vector<PeerConfig> peers;
  // Networks allowed to connect to the UCX data plane ("10.0.0.0/8", "192.168.1.7", "fd00::/8");
  // packets from anywhere else are dropped in the kernel before a connection exists. Empty = any
  // host that reaches the ports. Checked when the data plane starts (transport::TransportConfig).
  std::vector<std::string> data_allowed_sources;

  // ---- gRPC TLS. Certificate and key together enable TLS; adding the CA and
  // tls_require_client_cert enables mutual TLS. PEM files, read when the server starts.
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_ca_file;  // CA that client certificates must chain to
  bool tls_require_client_cert = false;
  // Serve gRPC without TLS on an address that is not loopback. Off: such a config is refused,
  // because anyone who reaches the port could then read and write KV through the daemon. Set it
  // only where a network policy or a pod boundary already limits who can connect.
  bool allow_insecure_grpc = false;

  // ---- Memory and concurrency bounds.
  // Bytes of encoded segments held at once across all transfers (staging, send and receive
  // queues); new work waits when it would exceed this.
  uint64_t max_inflight_bytes = uint64_t{1} << 30;
  // Model profiles (RegisterModel.profile) held at once, over all registered models.
  uint64_t max_profile_bytes = uint64_t{256} << 20;
  // Segments that arrive before their Receive: total bytes buffered, and how long they wait.
  uint64_t early_segment_buffer_bytes = uint64_t{256} << 20;
  absl::Duration early_segment_ttl = absl::Seconds(30);
  // On SIGTERM: how long transfers already moving data may take to finish before they are cut.
  // Keep it below the pod's terminationGracePeriodSeconds (30 s by default) so the daemon exits
  // on its own instead of being killed.
  absl::Duration shutdown_grace = absl::Seconds(20);
  // Send + Receive calls being served at once; more are refused with RESOURCE_EXHAUSTED.
  uint32_t max_concurrent_transfers = 64;
  // Shared-memory KV objects kept mapped between transfers (see ShmMappingCache); 0 maps each
  // transfer's region afresh.
  uint32_t shm_mapping_cache_entries = 16;
  // Idle CUDA IPC handles kept open between transfers (see CudaIpcMappingCache); 0 closes a
  // handle once no transfer uses it.
  uint32_t cuda_ipc_cache_entries = 16;
  // Threads one transfer's codec runs on: the sender's encoding ahead of the wire, the
  // receiver's decoding of arrived segments. 0 = half the hardware's threads, 1..4.
  uint32_t codec_threads = 0;

  // ---- Codec defaults (the bottom layer under model and request policies).
  CodecOptions default_codec_policy;

  // ---- Logging and UCX.
  LogLevel log_level = LogLevel::kInfo;
  std::string ucx_tls;          // value for UCX_TLS, e.g. "tcp" or "rc,sm"; empty = UCX's default
  std::string ucx_net_devices;  // value for UCX_NET_DEVICES, e.g. "eth0"; empty = UCX's default

  // ---- Provenance (not a key): the config file that was read, empty if none.
  std::string config_file;

  bool operator==(const DaemonConfig&) const = default;
};

// Looks up an environment variable. Injected so that tests never depend on the real environment.
using EnvironmentLookup = std::function<std::optional<std::string>(const std::string& name)>;
EnvironmentLookup ProcessEnvironment();

// Defaults < file < environment < flags, then auth_token_file is read, an empty daemon_id becomes
// the host name, and ValidateDaemonConfig() runs. `args` are the command-line arguments without
// the program name. The config file is named by --config_file=PATH or SKV_CONFIG_FILE; an absent
// name means defaults, a named file that cannot be read or parsed is an error. --help / -h are
// skipped (see HelpRequested). Errors are InvalidArgument (NotFound for missing files) naming the
// source (file:line, environment variable or flag), the key and the value.
absl::StatusOr<DaemonConfig> LoadDaemonConfig(std::span<const std::string> args,
                                              const EnvironmentLookup& env);
absl::StatusOr<DaemonConfig> LoadDaemonConfig(int argc, const char* const* argv);

// Cross-field rules: TLS key and certificate together; mutual TLS needs a CA; a token unless the
// data plane is loopback-only; unique peer ids.
absl::Status ValidateDaemonConfig(const DaemonConfig& config);

// Applies one key from a named source; the low-level step of LoadDaemonConfig.
absl::Status SetDaemonConfigKey(absl::string_view key, absl::string_view value,
                                DaemonConfig& config);

// Applies `key = value` lines; `source_name` prefixes error messages ("<source_name>:<line>").
// Blank lines and lines starting with '#' are ignored; a value may be wrapped in double quotes.
absl::Status ApplyConfigFileText(absl::string_view text, absl::string_view source_name,
                                 DaemonConfig& config);

bool HelpRequested(std::span<const std::string> args);

// --help text: every key with its flag, environment variable, default and documentation.
std::string DaemonConfigUsage(absl::string_view program_name);

// The config as config-file text (one `key = value` per key, secrets redacted): for logging the
// effective configuration at start-up.
std::string FormatDaemonConfig(const DaemonConfig& config);

// One row of the key table, for tools that list the keys.
struct DaemonConfigKeyInfo {
  absl::string_view key;  // file key; flag is --<key>, environment variable SKV_<KEY>
  absl::string_view doc;
  bool secret;
};
std::vector<DaemonConfigKeyInfo> DaemonConfigKeys();
std::string EnvironmentVariableForKey(absl::string_view key);  // "SKV_" + upper-case key

// True for localhost, 127.0.0.0/8, ::1 and unix: addresses.
bool IsLoopbackAddress(absl::string_view address);

// The peer token a daemon uses when none is configured; accepted on loopback data planes only.
inline constexpr char kLoopbackOnlyToken[] = "spectrumkv-loopback-only";

absl::string_view LogLevelName(LogLevel level);

}  // namespace skv::control
