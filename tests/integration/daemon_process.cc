#include "daemon_process.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "absl/strings/match.h"
#include "gtest/gtest.h"

namespace skv::testing {

std::vector<int> FreeLoopbackPorts(size_t count) {
  // Every socket stays bound until all are chosen: one closed before the next bind may hand the
  // same port out twice (a daemon then refuses two listeners on one address).
  std::vector<int> fds, ports;
  for (size_t i = 0; i < count; ++i) {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    socklen_t len = sizeof(addr);
    const bool bound = fd >= 0 && bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
                       getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0;
    if (fd >= 0) fds.push_back(fd);
    ports.push_back(bound ? ntohs(addr.sin_port) : -1);
  }
  for (int fd : fds) close(fd);
  return ports;
}

int FreeLoopbackPort() { return FreeLoopbackPorts(1)[0]; }

std::string DaemonBinary() {
  if (const char* env = std::getenv("SKV_DAEMON_BINARY"); env != nullptr && *env != '\0') {
    return env;
  }
  char self[4096];
  const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n > 0) {
    std::string sibling(self, size_t(n));
    sibling = sibling.substr(0, sibling.find_last_of('/') + 1) + "spectrumkvd";
    if (access(sibling.c_str(), X_OK) == 0) return sibling;
  }
  return SKV_DAEMON_BINARY;
}

absl::StatusOr<std::unique_ptr<DaemonProcess>> DaemonProcess::Start(const Options& options) {
  // A port found free can be taken by a test running in parallel before the daemon binds it;
  // only that failure is worth another try, with fresh ports.
  absl::StatusOr<std::unique_ptr<DaemonProcess>> d;
  for (int attempt = 0; attempt < 5; ++attempt) {
    d = StartOnce(options);
    if (d.ok() || !absl::StrContains(d.status().message(), "Address already in use")) break;
  }
  return d;
}

absl::StatusOr<std::unique_ptr<DaemonProcess>> DaemonProcess::StartOnce(const Options& options) {
  std::unique_ptr<DaemonProcess> d(new DaemonProcess());
  const std::vector<int> ports = FreeLoopbackPorts(3);
  d->grpc_address_ = absl::StrCat("127.0.0.1:", ports[0]);
  d->data_address_ = absl::StrCat("127.0.0.1:", ports[1]);
  d->metrics_address_ = absl::StrCat("127.0.0.1:", ports[2]);
  d->log_path_ = absl::StrCat(::testing::TempDir(), "/", options.daemon_id, "-", getpid(), ".log");
  std::vector<std::string> args = {DaemonBinary(),
                                   "--daemon_id=" + options.daemon_id,
                                   "--grpc_listen_address=" + d->grpc_address_,
                                   "--data_listen_address=" + d->data_address_,
                                   "--metrics_listen_address=" + d->metrics_address_,
                                   "--auth_token=" + options.auth_token,
                                   "--ucx_tls=tcp",
                                   "--ucx_net_devices=lo",
                                   "--early_segment_ttl_seconds=5"};
  std::string peers;
  for (const std::string& p : options.peers) peers += (peers.empty() ? "" : ",") + p;
  if (!peers.empty()) args.push_back("--peers=" + peers);
  for (const std::string& f : options.extra_flags) args.push_back(f);

  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0) return absl::InternalError("fork failed");
  if (pid == 0) {
    // Die with the test process if it dies first (a sanitizer halt, a ctest timeout's SIGKILL):
    // a daemon must never outlive the test that started it.
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(126);
    FILE* log = std::fopen(d->log_path_.c_str(), "w");
    if (log != nullptr) {
      dup2(fileno(log), STDOUT_FILENO);
      dup2(fileno(log), STDERR_FILENO);
    }
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    std::fprintf(stderr, "cannot run %s: %s (SKV_DAEMON_BINARY overrides the daemon's path)\n",
                 argv[0], std::strerror(errno));
    _exit(127);
  }
  d->pid_ = pid;
  absl::StatusOr<std::unique_ptr<client::SpectrumKvClient>> c =
      client::SpectrumKvClient::Connect(d->grpc_address_);
  if (!c.ok()) return c.status();
  d->client_ = std::move(*c);
  // Ready when gRPC answers; fail fast if the process died (bad flags, port taken).
  for (int i = 0; i < 200; ++i) {
    if (!d->Alive())
      return absl::InternalError(absl::StrCat("spectrumkvd exited at start:\n", d->Log()));
    if (d->client_->WaitUntilServing(std::chrono::milliseconds(50)).ok()) return d;
  }
  return absl::DeadlineExceededError(
      absl::StrCat("spectrumkvd did not start in 10 s:\n", d->Log()));
}

std::string DaemonProcess::Log() const {
  std::ifstream in(log_path_);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

bool DaemonProcess::Alive() {
  if (pid_ <= 0) return false;
  int status = 0;
  if (waitpid(pid_, &status, WNOHANG) == pid_) {
    pid_ = -1;
    return false;
  }
  return true;
}

int DaemonProcess::Stop(int signal) {
  if (pid_ <= 0) return -1;
  kill(pid_, signal);
  int status = 0;
  for (int i = 0; i < 200; ++i) {
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return status;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  kill(pid_, SIGKILL);
  waitpid(pid_, &status, 0);
  pid_ = -1;
  return status;
}

absl::StatusOr<std::string> ScrapeMetrics(const std::string& address) {
  const size_t colon = address.rfind(':');
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(uint16_t(std::stoi(address.substr(colon + 1))));
  inet_pton(AF_INET, address.substr(0, colon).c_str(), &addr.sin_addr);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return absl::UnavailableError(absl::StrCat("cannot connect to ", address));
  }
  const std::string request = absl::StrCat("GET /metrics HTTP/1.0\r\nHost: ", address, "\r\n\r\n");
  (void)!write(fd, request.data(), request.size());
  std::string response;
  char buf[65536];
  for (ssize_t n; (n = read(fd, buf, sizeof(buf))) > 0;) response.append(buf, size_t(n));
  close(fd);
  const size_t body = response.find("\r\n\r\n");
  if (response.rfind("HTTP/1.", 0) != 0 || body == std::string::npos) {
    return absl::DataLossError("not an HTTP response");
  }
  return response.substr(body + 4);
}

absl::StatusOr<DaemonPair> StartDaemonPair(const std::vector<std::string>& decode_flags) {
  DaemonPair pair;
  absl::StatusOr<std::unique_ptr<DaemonProcess>> decode =
      DaemonProcess::Start({.daemon_id = "decode", .extra_flags = decode_flags});
  if (!decode.ok()) return decode.status();
  pair.decode = std::move(*decode);
  absl::StatusOr<std::unique_ptr<DaemonProcess>> prefill = DaemonProcess::Start(
      {.daemon_id = "prefill", .peers = {"decode=" + pair.decode->data_address()}});
  if (!prefill.ok()) return prefill.status();
  pair.prefill = std::move(*prefill);
  return pair;
}

}  // namespace skv::testing
