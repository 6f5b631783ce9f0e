// spectrumkvd: the SpectrumKV sidecar daemon. See `spectrumkvd --help` for every setting.
#include <sys/resource.h>

#include <csignal>
#include <iostream>
#include <memory>

#include "absl/strings/str_cat.h"
#include "daemon.h"
#include "grpc/grpc.h"
#include "grpc_service.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "reflection_v1.h"
#include "spdlog/spdlog.h"
#include "spectrumkv/control/daemon_config.h"
#include "spectrumkv/control/metrics.h"

namespace {

void SetLogLevel(skv::control::LogLevel level) {
  using skv::control::LogLevel;
  static constexpr spdlog::level::level_enum kLevels[] = {
      spdlog::level::trace, spdlog::level::debug,    spdlog::level::info, spdlog::level::warn,
      spdlog::level::err,   spdlog::level::critical, spdlog::level::off};
  spdlog::set_level(kLevels[static_cast<int>(level)]);
}

// Raises the soft fd limit to the hard one: each peer connection, shared-memory mapping and
// reclaimed abandoned connection (abandoned_sockets.h) takes an fd, and 1024 is soon too few.
void RaiseFdLimit() {
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) != 0 || limit.rlim_cur >= limit.rlim_max) return;
  const rlim_t before = limit.rlim_cur;
  limit.rlim_cur = limit.rlim_max;
  if (setrlimit(RLIMIT_NOFILE, &limit) == 0) {
    spdlog::info("fd limit raised from {} to {}", before, limit.rlim_cur);
  }
}

int Run(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (skv::control::HelpRequested(args)) {
    std::cout << skv::control::DaemonConfigUsage("spectrumkvd");
    return 0;
  }
  absl::StatusOr<skv::control::DaemonConfig> config = skv::control::LoadDaemonConfig(argc, argv);
  if (!config.ok()) {
    std::cerr << "spectrumkvd: invalid configuration: " << config.status().message() << "\n";
    return 2;
  }
  SetLogLevel(config->log_level);
  RaiseFdLimit();
  spdlog::info("spectrumkvd '{}' starting; effective configuration:\n{}", config->daemon_id,
               skv::control::FormatDaemonConfig(*config));

  // Block the shutdown signals in every thread; a dedicated wait below receives them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  // Never released (and taken after the mask above, which gRPC's threads inherit): gRPC's last
  // grpc_shutdown() joins its executor threads, and one can sit in a poll for up to ~10 s after
  // the server has stopped (seen in the soak's kill/restart runs), holding the exit past the
  // orchestrator's grace period. Once the server has stopped and every handler has returned,
  // exit() takes those idle threads with the process.
  grpc_init();

  skv::control::Metrics metrics;
  std::unique_ptr<skv::control::MetricsHttpEndpoint> metrics_endpoint;
  if (!config->metrics_listen_address.empty()) {
    absl::StatusOr<std::unique_ptr<skv::control::MetricsHttpEndpoint>> endpoint =
        skv::control::MetricsHttpEndpoint::Start(config->metrics_listen_address, metrics);
    if (!endpoint.ok()) {
      spdlog::critical("metrics endpoint: {}", endpoint.status().ToString());
      return 1;
    }
    metrics_endpoint = std::move(*endpoint);
    spdlog::info("metrics on http://{}/metrics", config->metrics_listen_address);
  }
  absl::StatusOr<std::unique_ptr<skv::daemon::Daemon>> daemon =
      skv::daemon::Daemon::Start(*config, &metrics, nullptr);
  if (!daemon.ok()) {
    spdlog::critical("{}", daemon.status().ToString());
    return 1;
  }
  if (config->tls_cert_file.empty() &&
      !skv::control::IsLoopbackAddress(config->grpc_listen_address)) {
    spdlog::warn(
        "INSECURE: gRPC on {} without TLS (allow_insecure_grpc=true): anyone who reaches this "
        "port can read and write KV through this daemon",
        config->grpc_listen_address);
  }
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials =
      skv::daemon::MakeServerCredentials(*config);
  if (!credentials.ok()) {
    spdlog::critical("{}", credentials.status().ToString());
    return 1;
  }
  skv::daemon::SpectrumKvService service(daemon->get(), config->max_concurrent_transfers);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int bound_port = 0;
  builder.AddListeningPort(config->grpc_listen_address, *credentials, &bound_port);
  builder.SetMaxReceiveMessageSize(int(skv::control::kMaxGrpcMessageBytes));
  builder.SetMaxSendMessageSize(int(skv::control::kMaxGrpcMessageBytes));
  builder.RegisterService(&service);
  // v1alpha comes from gRPC's plugin above; v1 is ours (reflection_v1.h).
  skv::daemon::ReflectionV1Service reflection_v1(
      {spectrumkv::v1::SpectrumKV::service_full_name(), "grpc.health.v1.Health",
       "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"});
  builder.RegisterService(&reflection_v1);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || bound_port == 0) {
    spdlog::critical("cannot serve gRPC on {}", config->grpc_listen_address);
    return 1;
  }
  // Health answers for "" (the whole server) and for the service name, as probes ask either.
  server->GetHealthCheckService()->SetServingStatus(spectrumkv::v1::SpectrumKV::service_full_name(),
                                                    true);
  server->GetHealthCheckService()->SetServingStatus(true);
  spdlog::info("gRPC API on {} (port {}), data plane on {}", config->grpc_listen_address,
               bound_port, (*daemon)->data_address());
  std::cout << "spectrumkvd ready: grpc=" << config->grpc_listen_address
            << " data=" << (*daemon)->data_address() << std::endl;

  int signal_number = 0;
  sigwait(&signals, &signal_number);
  spdlog::info("signal {}: shutting down (new transfers refused; in-flight ones get {})",
               signal_number, absl::FormatDuration(config->shutdown_grace));
  server->GetHealthCheckService()->SetServingStatus(false);
  (*daemon)->Drain(config->shutdown_grace);  // then fails what is left, so the calls below finish
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  spdlog::info("stopped");
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return Run(argc, argv); }
