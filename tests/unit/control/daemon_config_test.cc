#include "spectrumkv/control/daemon_config.h"

#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace skv::control {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::Not;

// An environment made of a map, so tests never see (or depend on) the real one.
EnvironmentLookup FakeEnv(std::map<std::string, std::string> vars) {
  return [vars = std::move(vars)](const std::string& name) -> std::optional<std::string> {
    auto it = vars.find(name);
    if (it == vars.end()) return std::nullopt;
    return it->second;
  };
}

// A file under the test temp dir, removed when the test ends.
class TempFile {
 public:
  explicit TempFile(const std::string& contents) {
    path_ = ::testing::TempDir() + "skv_config_test_" + std::to_string(::getpid()) + "_" +
            std::to_string(counter_++);
    std::ofstream(path_) << contents;
  }
  ~TempFile() { std::remove(path_.c_str()); }
  const std::string& path() const { return path_; }

 private:
  static inline int counter_ = 0;
  std::string path_;
};

absl::StatusOr<DaemonConfig> Load(std::vector<std::string> args,
                                  std::map<std::string, std::string> env = {}) {
  return LoadDaemonConfig(args, FakeEnv(std::move(env)));
}

TEST(DaemonConfigTest, DefaultsWithoutAnySource) {
  auto config = Load({});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->grpc_listen_address, "127.0.0.1:50551");
  EXPECT_EQ(config->metrics_listen_address, "127.0.0.1:9464");
  EXPECT_EQ(config->data_listen_address, "127.0.0.1:50552");
  EXPECT_FALSE(config->daemon_id.empty());  // the host name
  EXPECT_TRUE(config->auth_token.empty());
  EXPECT_TRUE(config->peers.empty());
  EXPECT_EQ(config->max_inflight_bytes, uint64_t{1} << 30);
  EXPECT_EQ(config->early_segment_buffer_bytes, uint64_t{256} << 20);
  EXPECT_EQ(config->max_profile_bytes, uint64_t{256} << 20);
  EXPECT_EQ(config->early_segment_ttl, absl::Seconds(30));
  EXPECT_EQ(config->max_concurrent_transfers, 64u);
  EXPECT_EQ(config->default_codec_policy, CodecOptions{});
  EXPECT_EQ(config->log_level, LogLevel::kInfo);
  EXPECT_TRUE(config->config_file.empty());
}

TEST(DaemonConfigTest, PrecedenceIsDefaultsFileEnvironmentFlags) {
  TempFile file(
      "# comment line\n"
      "\n"
      "log_level = debug\n"
      "max_concurrent_transfers = 10\n"
      "codec_sink_tokens = 8\n"
      "ucx_tls = \"tcp\"\n");
  auto config = Load({"--config_file=" + file.path(), "--codec_sink_tokens=16"},
                     {{"SKV_MAX_CONCURRENT_TRANSFERS", "20"}, {"SKV_CODEC_SINK_TOKENS", "12"}});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->log_level, LogLevel::kDebug);            // file only
  EXPECT_EQ(config->ucx_tls, "tcp");                         // file, quotes stripped
  EXPECT_EQ(config->max_concurrent_transfers, 20u);          // env beats file
  EXPECT_EQ(config->default_codec_policy.sink_tokens, 16u);  // flag beats env and file
  EXPECT_EQ(config->config_file, file.path());
  EXPECT_EQ(config->grpc_listen_address, "127.0.0.1:50551");  // untouched default
}

TEST(DaemonConfigTest, ConfigFileNamedByEnvironmentAndFlagWins) {
  TempFile from_env("daemon_id = from-env-file\n");
  TempFile from_flag("daemon_id = from-flag-file\n");
  auto config = Load({"--config_file=" + from_flag.path()}, {{"SKV_CONFIG_FILE", from_env.path()}});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->daemon_id, "from-flag-file");
  auto env_only = Load({}, {{"SKV_CONFIG_FILE", from_env.path()}});
  ASSERT_TRUE(env_only.ok()) << env_only.status();
  EXPECT_EQ(env_only->daemon_id, "from-env-file");
}

TEST(DaemonConfigTest, NamedButMissingConfigFileIsNotFound) {
  auto config = Load({"--config_file=/nonexistent/skv.conf"});
  EXPECT_EQ(config.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(config.status().message(), HasSubstr("/nonexistent/skv.conf"));
}

TEST(DaemonConfigTest, FileErrorsNameLineAndKey) {
  {
    TempFile file("log_level = info\nmax_inflight_bytes = 12XB\n");
    auto config = Load({"--config_file=" + file.path()});
    EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(config.status().message(),
                AllOf(HasSubstr(file.path() + ":2"), HasSubstr("'max_inflight_bytes'"),
                      HasSubstr("'12XB'")));
  }
  {
    TempFile file("\n\nno_such_key = 1\n");
    auto config = Load({"--config_file=" + file.path()});
    EXPECT_THAT(config.status().message(),
                AllOf(HasSubstr(":3"), HasSubstr("unknown key 'no_such_key'")));
  }
  {
    TempFile file("log_level debug\n");
    auto config = Load({"--config_file=" + file.path()});
    EXPECT_THAT(config.status().message(), AllOf(HasSubstr(":1"), HasSubstr("key = value")));
  }
  {
    TempFile file("log_level = info\nlog_level = debug\n");
    auto config = Load({"--config_file=" + file.path()});
    EXPECT_THAT(config.status().message(),
                AllOf(HasSubstr(":2"), HasSubstr("'log_level'"), HasSubstr("line 1")));
  }
  {
    TempFile file("config_file = /etc/other.conf\n");
    auto config = Load({"--config_file=" + file.path()});
    EXPECT_THAT(config.status().message(), HasSubstr("cannot be set inside a config file"));
  }
}

TEST(DaemonConfigTest, EnvironmentErrorsNameVariableKeyAndValue) {
  auto config = Load({}, {{"SKV_MAX_INFLIGHT_BYTES", "lots"}});
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(config.status().message(),
              AllOf(HasSubstr("environment SKV_MAX_INFLIGHT_BYTES"),
                    HasSubstr("'max_inflight_bytes'"), HasSubstr("'lots'")));
}

TEST(DaemonConfigTest, UnknownEnvironmentVariablesAreIgnored) {
  EXPECT_TRUE(Load({}, {{"SKV_WITH_CUDA", "OFF"}, {"SKV_NOT_A_KEY", "x"}}).ok());
}

TEST(DaemonConfigTest, FlagParsing) {
  auto config = Load({"--grpc-listen-address=127.0.0.1:7000", "--tls_require_client_cert=false",
                      "--codec_allow_int2", "--daemon_id=node-a", "--codec_transform_coding"});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->grpc_listen_address, "127.0.0.1:7000");  // '-' and '_' are alike
  EXPECT_TRUE(config->default_codec_policy.allowed_tiers.Has(Tier::kInt2));  // bare flag = true
  EXPECT_EQ(config->daemon_id, "node-a");
  EXPECT_TRUE(config->default_codec_policy.transform_coding);

  EXPECT_THAT(Load({"--no_such_flag=1"}).status().message(), HasSubstr("unknown flag"));
  EXPECT_THAT(Load({"positional"}).status().message(), HasSubstr("unexpected argument"));
  EXPECT_THAT(Load({"--log_level"}).status().message(), HasSubstr("needs a value"));
  auto bad = Load({"--max_concurrent_transfers=0"});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(),
              AllOf(HasSubstr("flag --max_concurrent_transfers"), HasSubstr("'0'")));
  // --help is left to the caller.
  EXPECT_TRUE(Load({"--help"}).ok());
  EXPECT_TRUE(HelpRequested(std::vector<std::string>{"--log_level=info", "-h"}));
  EXPECT_FALSE(HelpRequested(std::vector<std::string>{"--log_level=info"}));
}

TEST(DaemonConfigTest, LastRepeatedFlagWins) {
  auto config = Load({"--log_level=error", "--log_level=warn"});
  ASSERT_TRUE(config.ok());
  EXPECT_EQ(config->log_level, LogLevel::kWarn);
}

TEST(DaemonConfigTest, ByteSizes) {
  struct Case {
    std::string text;
    uint64_t bytes;
  };
  for (const Case& c :
       {Case{"1048576", 1 << 20}, Case{"2MiB", 2 << 20}, Case{"1GiB", 1 << 30},
        Case{"3gib", uint64_t{3} << 30}, Case{"2 MB", 2000000}, Case{"1TiB", uint64_t{1} << 40}}) {
    DaemonConfig config;
    ASSERT_TRUE(SetDaemonConfigKey("max_inflight_bytes", c.text, config).ok()) << c.text;
    EXPECT_EQ(config.max_inflight_bytes, c.bytes) << c.text;
  }
  for (const char* bad : {"", "1G", "-1", "1.5GiB", "GiB", "99999999999999999999", "20000000TiB",
                          "1024"}) {  // 1024 is below the 1 MiB minimum
    DaemonConfig config;
    EXPECT_EQ(SetDaemonConfigKey("max_inflight_bytes", bad, config).code(),
              absl::StatusCode::kInvalidArgument)
        << bad;
  }
}

TEST(DaemonConfigTest, ValueParsers) {
  DaemonConfig c;
  EXPECT_TRUE(SetDaemonConfigKey("early_segment_ttl_seconds", "2.5", c).ok());
  EXPECT_EQ(c.early_segment_ttl, absl::Milliseconds(2500));
  for (const char* bad : {"0", "-1", "nan", "inf", "3601", "x"}) {
    EXPECT_FALSE(SetDaemonConfigKey("early_segment_ttl_seconds", bad, c).ok()) << bad;
  }
  EXPECT_TRUE(SetDaemonConfigKey("log_level", "WARNING", c).ok());
  EXPECT_EQ(c.log_level, LogLevel::kWarn);
  EXPECT_FALSE(SetDaemonConfigKey("log_level", "verbose", c).ok());
  EXPECT_TRUE(SetDaemonConfigKey("codec_allocator", "paper", c).ok());
  EXPECT_EQ(c.default_codec_policy.allocator, AllocatorKind::kPaper);
  EXPECT_FALSE(SetDaemonConfigKey("codec_allocator", "greedy", c).ok());
  EXPECT_TRUE(SetDaemonConfigKey("codec_group_size", "64", c).ok());
  EXPECT_FALSE(SetDaemonConfigKey("codec_group_size", "48x", c).ok());
  EXPECT_FALSE(SetDaemonConfigKey("codec_group_size", "12", c).ok());  // not a multiple of 8
  EXPECT_FALSE(SetDaemonConfigKey("codec_sink_tokens", "5000", c).ok());
  EXPECT_FALSE(SetDaemonConfigKey("codec_rotate", "maybe", c).ok());
  EXPECT_TRUE(SetDaemonConfigKey("codec_rotate", "off", c).ok());
  EXPECT_FALSE(c.default_codec_policy.rotate_keys || c.default_codec_policy.rotate_values);
  EXPECT_TRUE(c.default_codec_policy.allow_drop);
  EXPECT_TRUE(SetDaemonConfigKey("codec_allow_drop", "false", c).ok());
  EXPECT_FALSE(c.default_codec_policy.allow_drop);
  EXPECT_FALSE(SetDaemonConfigKey("codec_allow_drop", "sometimes", c).ok());
  EXPECT_EQ(c.default_codec_policy.entropy_coder, EntropyCoder::kNone);
  EXPECT_TRUE(SetDaemonConfigKey("codec_entropy_coding", "true", c).ok());
  EXPECT_EQ(c.default_codec_policy.entropy_coder, EntropyCoder::kZstd);
  EXPECT_FALSE(SetDaemonConfigKey("max_concurrent_transfers", "+5", c).ok());
  EXPECT_TRUE(SetDaemonConfigKey("codec_threads", "2", c).ok());
  EXPECT_EQ(c.codec_threads, 2u);
  EXPECT_FALSE(SetDaemonConfigKey("codec_threads", "65", c).ok());
  EXPECT_FALSE(SetDaemonConfigKey("daemon_id", "has space", c).ok());
  EXPECT_EQ(SetDaemonConfigKey("nope", "1", c).code(), absl::StatusCode::kInvalidArgument);
}

TEST(DaemonConfigTest, ListenAddresses) {
  DaemonConfig c;
  for (const char* ok : {"127.0.0.1:1", "[::1]:50551", "localhost:0", "node-1.example:65535"}) {
    EXPECT_TRUE(SetDaemonConfigKey("data_listen_address", ok, c).ok()) << ok;
  }
  for (const char* bad : {"127.0.0.1", "127.0.0.1:65536", ":80", "::1:80", "[::1]80",
                          "[nothost]:80", "host:port", "unix:/tmp/s", "a b:1"}) {
    EXPECT_FALSE(SetDaemonConfigKey("data_listen_address", bad, c).ok()) << bad;
  }
  EXPECT_TRUE(SetDaemonConfigKey("grpc_listen_address", "unix:/run/skv.sock", c).ok());
  EXPECT_FALSE(SetDaemonConfigKey("grpc_listen_address", "unix:", c).ok());
  EXPECT_TRUE(SetDaemonConfigKey("metrics_listen_address", "", c).ok());  // disabled
}

TEST(DaemonConfigTest, Peers) {
  DaemonConfig c;
  ASSERT_TRUE(
      SetDaemonConfigKey("peers", "decode-0=10.0.0.2:50552, decode-1=[fd00::3]:50552", c).ok());
  ASSERT_EQ(c.peers.size(), 2u);
  EXPECT_EQ(c.peers[0], (PeerConfig{"decode-0", "10.0.0.2:50552"}));
  EXPECT_EQ(c.peers[1], (PeerConfig{"decode-1", "[fd00::3]:50552"}));
  EXPECT_FALSE(SetDaemonConfigKey("peers", "decode-0", c).ok());
  EXPECT_FALSE(SetDaemonConfigKey("peers", "=10.0.0.2:1", c).ok());
  EXPECT_FALSE(SetDaemonConfigKey("peers", "a=10.0.0.2", c).ok());

  auto dup_id = Load({"--peers=a=127.0.0.1:1,a=127.0.0.1:2"});
  EXPECT_THAT(dup_id.status().message(), AllOf(HasSubstr("peers"), HasSubstr("'a'")));
  auto dup_address = Load({"--peers=a=127.0.0.1:1,b=127.0.0.1:1"});
  EXPECT_THAT(dup_address.status().message(), HasSubstr("listed twice"));
}

TEST(DaemonConfigTest, DataAllowedSources) {
  DaemonConfig c;
  ASSERT_TRUE(
      SetDaemonConfigKey("data_allowed_sources", "10.0.0.0/8, fd00::/8,192.168.1.7", c).ok());
  EXPECT_EQ(c.data_allowed_sources,
            (std::vector<std::string>{"10.0.0.0/8", "fd00::/8", "192.168.1.7"}));
  ASSERT_TRUE(SetDaemonConfigKey("data_allowed_sources", "", c).ok());
  EXPECT_TRUE(c.data_allowed_sources.empty());
  // The addresses themselves are checked where the data plane starts (transport config), with
  // the same message; see UcxTransportTest.AllowedSourceNetworksAreValidated.
}

TEST(DaemonConfigTest, TokenRequiredOffLoopback) {
  auto open = Load({"--data_listen_address=0.0.0.0:50552"});
  EXPECT_EQ(open.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(open.status().message(), HasSubstr("auth_token"));
  EXPECT_TRUE(Load({"--data_listen_address=0.0.0.0:50552"}, {{"SKV_AUTH_TOKEN", "s3cret"}}).ok());
  EXPECT_TRUE(Load({"--data_listen_address=[::1]:50552"}).ok());
}

TEST(DaemonConfigTest, TokenFile) {
  TempFile token("  s3cret-token \n");
  auto config = Load({"--auth_token_file=" + token.path()});
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->auth_token, "s3cret-token");

  auto both = Load({"--auth_token_file=" + token.path(), "--auth_token=x"});
  EXPECT_THAT(both.status().message(), HasSubstr("auth_token_file"));
  auto missing = Load({"--auth_token_file=/nonexistent/token"});
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  TempFile blank("\n  \n");
  EXPECT_THAT(Load({"--auth_token_file=" + blank.path()}).status().message(),
              HasSubstr("holds no token"));
}

TEST(DaemonConfigTest, TlsPairsAndMutualTls) {
  auto cert_only = Load({"--tls_cert_file=/c.pem"});
  EXPECT_THAT(cert_only.status().message(), HasSubstr("must be set together"));
  auto mtls_without_ca =
      Load({"--tls_cert_file=/c.pem", "--tls_key_file=/k.pem", "--tls_require_client_cert"});
  EXPECT_THAT(mtls_without_ca.status().message(), HasSubstr("tls_require_client_cert"));
  EXPECT_TRUE(Load({"--tls_cert_file=/c.pem", "--tls_key_file=/k.pem", "--tls_ca_file=/ca.pem",
                    "--tls_require_client_cert"})
                  .ok());
}

TEST(DaemonConfigTest, PlaintextOffLoopbackAndHalfMutualTlsAreRefused) {
  auto open_grpc = Load({"--grpc_listen_address=0.0.0.0:50551"});
  EXPECT_THAT(open_grpc.status().message(),
              AllOf(HasSubstr("grpc_listen_address"), HasSubstr("TLS is off")));
  EXPECT_TRUE(Load({"--grpc_listen_address=0.0.0.0:50551", "--allow_insecure_grpc"}).ok());
  EXPECT_TRUE(Load({"--grpc_listen_address=0.0.0.0:50551", "--tls_cert_file=/c.pem",
                    "--tls_key_file=/k.pem"})
                  .ok());
  EXPECT_TRUE(Load({"--grpc_listen_address=unix:/run/skv.sock"}).ok());
  // A CA without the requirement would verify no client certificate at all.
  auto half = Load({"--tls_cert_file=/c.pem", "--tls_key_file=/k.pem", "--tls_ca_file=/ca.pem"});
  EXPECT_THAT(half.status().message(), HasSubstr("tls_ca_file"));
  // The built-in loopback token is no secret: refused on any other data address.
  auto builtin =
      Load({"--data_listen_address=10.0.0.5:50552", "--auth_token=spectrumkv-loopback-only"});
  EXPECT_THAT(builtin.status().message(), HasSubstr("auth_token"));
}

TEST(DaemonConfigTest, ListenersMustDiffer) {
  auto clash = Load({"--metrics_listen_address=127.0.0.1:50551"});
  EXPECT_THAT(clash.status().message(),
              AllOf(HasSubstr("metrics_listen_address"), HasSubstr("grpc_listen_address")));
  // Port 0 picks distinct ports, so equal ":0" addresses are fine.
  EXPECT_TRUE(
      Load({"--grpc_listen_address=127.0.0.1:0", "--data_listen_address=127.0.0.1:0"}).ok());
}

TEST(DaemonConfigTest, FormatRoundTripsAndRedactsSecrets) {
  DaemonConfig original;
  original.daemon_id = "node-a";
  original.peers = {{"b", "127.0.0.1:6000"}, {"c", "[::1]:6001"}};
  original.metrics_listen_address = "";
  original.max_inflight_bytes = 3 << 20;
  original.max_profile_bytes = 5 << 20;
  original.early_segment_ttl = absl::Milliseconds(1500);
  original.default_codec_policy.allocator = AllocatorKind::kPaper;
  original.default_codec_policy.recent_tokens = 32;
  original.log_level = LogLevel::kTrace;
  original.ucx_net_devices = "lo";
  const std::string text = FormatDaemonConfig(original);
  DaemonConfig parsed;
  ASSERT_TRUE(ApplyConfigFileText(text, "formatted", parsed).ok()) << text;
  EXPECT_EQ(parsed, original) << text;

  original.auth_token = "top-secret";
  EXPECT_THAT(FormatDaemonConfig(original),
              AllOf(Not(HasSubstr("top-secret")), HasSubstr("auth_token = \"<redacted>\"")));
}

TEST(DaemonConfigTest, UsageListsEveryKeyWithEnvironmentAndDefault) {
  const std::string usage = DaemonConfigUsage("spectrumkvd");
  for (const DaemonConfigKeyInfo& key : DaemonConfigKeys()) {
    EXPECT_THAT(usage, HasSubstr("--" + std::string(key.key) + "=")) << key.key;
    EXPECT_THAT(usage, HasSubstr(EnvironmentVariableForKey(key.key))) << key.key;
    EXPECT_FALSE(key.doc.empty()) << key.key;
  }
  EXPECT_THAT(usage, HasSubstr("default '127.0.0.1:50551'"));
  EXPECT_EQ(EnvironmentVariableForKey("max_inflight_bytes"), "SKV_MAX_INFLIGHT_BYTES");
}

TEST(DaemonConfigTest, LoopbackAddresses) {
  for (const char* a : {"127.0.0.1:1", "127.8.9.10:1", "localhost:1", "[::1]:1", "unix:/x"}) {
    EXPECT_TRUE(IsLoopbackAddress(a)) << a;
  }
  for (const char* a : {"0.0.0.0:1", "10.0.0.1:1", "[::]:1", "node:1", "garbage"}) {
    EXPECT_FALSE(IsLoopbackAddress(a)) << a;
  }
}

}  // namespace
}  // namespace skv::control
