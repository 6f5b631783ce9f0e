// Starts spectrumkvd as a real child process on loopback ports of its own, and stops it (by PID)
// when the owner goes away. For integration tests.
#pragma once

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "spectrumkv/client/client.h"

namespace skv::testing {

// The spectrumkvd that Start runs: the environment variable SKV_DAEMON_BINARY when set and not
// empty; else a spectrumkvd in the folder of the running test binary (so a copied bundle of
// binaries, e.g. scripts/gpu-bundle.sh's .gpu-bundle/bin/, runs its own daemon); else the build's
// daemon, whose path is compiled in (the SKV_DAEMON_BINARY compile definition).
std::string DaemonBinary();

// `count` distinct TCP ports nobody listens on right now (bind each to 0, read them back, close
// them all), and one such port.
std::vector<int> FreeLoopbackPorts(size_t count);
int FreeLoopbackPort();

class DaemonProcess {
 public:
  struct Options {
    std::string daemon_id;
    std::string auth_token = "integration-token";
    std::vector<std::string> peers = {};  // "id=host:port"
    std::vector<std::string> extra_flags = {};
  };

  static absl::StatusOr<std::unique_ptr<DaemonProcess>> Start(const Options& options);
  ~DaemonProcess() { Stop(SIGKILL); }
  DaemonProcess(const DaemonProcess&) = delete;
  DaemonProcess& operator=(const DaemonProcess&) = delete;

  const std::string& grpc_address() const { return grpc_address_; }
  const std::string& data_address() const { return data_address_; }
  const std::string& metrics_address() const { return metrics_address_; }
  pid_t pid() const { return pid_; }
  client::SpectrumKvClient& client() { return *client_; }
  std::string Log() const;
  bool Alive();
  // Sends `signal` and waits up to 10 s for the exit (then SIGKILL). Returns the exit status.
  int Stop(int signal);

 private:
  DaemonProcess() = default;
  static absl::StatusOr<std::unique_ptr<DaemonProcess>> StartOnce(const Options& options);
  pid_t pid_ = -1;
  std::string grpc_address_, data_address_, metrics_address_, log_path_;
  std::unique_ptr<client::SpectrumKvClient> client_;
};

// GET http://<address>/metrics with a plain socket; the body.
absl::StatusOr<std::string> ScrapeMetrics(const std::string& address);

// A decode daemon and a prefill daemon that knows it as its peer "decode".
struct DaemonPair {
  std::unique_ptr<DaemonProcess> prefill, decode;
};
// `decode_flags` go to the decode daemon (e.g. a short early-segment TTL).
absl::StatusOr<DaemonPair> StartDaemonPair(const std::vector<std::string>& decode_flags = {});

}  // namespace skv::testing
