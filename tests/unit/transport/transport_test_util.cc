#include "transport_test_util.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace spectrumkv::transport::testing {

TransportConfig TestConfig(std::string daemon_id, std::string auth_token) {
  TransportConfig config;
  config.daemon_id = std::move(daemon_id);
  config.auth_token = std::move(auth_token);
  config.listen_address = "127.0.0.1:0";
  config.handshake_timeout = absl::Seconds(3);
  config.send_wait_timeout = absl::Seconds(2);
  return config;
}

std::vector<std::byte> PatternPayload(size_t size, uint64_t seed) {
  std::vector<std::byte> bytes(size);
  uint64_t state = seed * 0x9E3779B97F4A7C15ULL + size;
  for (size_t i = 0; i < size; i += 8) {
    // splitmix64
    state += 0x9E3779B97F4A7C15ULL;
    uint64_t z = state;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    std::memcpy(bytes.data() + i, &z, std::min<size_t>(8, size - i));
  }
  return bytes;
}

uint64_t Checksum(absl::Span<const std::byte> bytes) {
  // FNV-1a over 64-bit words (and the tail bytes), mixed with the length.
  uint64_t hash = 0xCBF29CE484222325ULL ^ bytes.size();
  size_t i = 0;
  for (; i + 8 <= bytes.size(); i += 8) {
    uint64_t word;
    std::memcpy(&word, bytes.data() + i, 8);
    hash = (hash ^ word) * 0x100000001B3ULL;
  }
  for (; i < bytes.size(); ++i) {
    hash = (hash ^ static_cast<uint64_t>(bytes[i])) * 0x100000001B3ULL;
  }
  return hash;
}

// ---- Inbox ----

TransportHandlers Inbox::Handlers() {
  return TransportHandlers{
      .on_message =
          [this](ReceivedMessage message) {
            std::function<void(const ReceivedMessage&)> hook;
            {
              MutexLock lock(&mutex_);
              hook = hook_;
            }
            if (hook) hook(message);
            MutexLock lock(&mutex_);
            if (drop_payloads_) message.payload = MessageBuffer();
            messages_.push_back(std::move(message));
            ++received_;
          },
      .on_peer_event =
          [this](const PeerEvent& event) {
            MutexLock lock(&mutex_);
            events_.push_back(event);
          },
  };
}

bool Inbox::WaitForMessages(size_t count, absl::Duration timeout) {
  MutexLock lock(&mutex_);
  auto enough = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) { return received_ >= count; };
  return mutex_.AwaitWithTimeout(enough, timeout);
}

bool Inbox::WaitForEvents(PeerEventKind kind, size_t count, absl::Duration timeout) {
  MutexLock lock(&mutex_);
  auto enough = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
    size_t seen = 0;
    for (const PeerEvent& event : events_) seen += event.kind == kind ? 1 : 0;
    return seen >= count;
  };
  return mutex_.AwaitWithTimeout(enough, timeout);
}

std::vector<ReceivedMessage> Inbox::TakeMessages() {
  MutexLock lock(&mutex_);
  return std::exchange(messages_, {});
}

std::vector<PeerEvent> Inbox::Events(PeerEventKind kind) {
  MutexLock lock(&mutex_);
  std::vector<PeerEvent> matching;
  for (const PeerEvent& event : events_) {
    if (event.kind == kind) matching.push_back(event);
  }
  return matching;
}

size_t Inbox::message_count() {
  MutexLock lock(&mutex_);
  return received_;
}

void Inbox::SetMessageHook(std::function<void(const ReceivedMessage&)> hook) {
  MutexLock lock(&mutex_);
  hook_ = std::move(hook);
}

// ---- SendTracker ----

SendCallback SendTracker::Track() {
  return [this](absl::Status status) {
    MutexLock lock(&mutex_);
    statuses_.push_back(std::move(status));
  };
}

bool SendTracker::WaitForCompletions(size_t count, absl::Duration timeout) {
  MutexLock lock(&mutex_);
  auto enough = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) { return statuses_.size() >= count; };
  return mutex_.AwaitWithTimeout(enough, timeout);
}

std::vector<absl::Status> SendTracker::statuses() {
  MutexLock lock(&mutex_);
  return statuses_;
}

size_t SendTracker::completed() {
  MutexLock lock(&mutex_);
  return statuses_.size();
}

// ---- PeerProcess ----

absl::StatusOr<std::unique_ptr<PeerProcess>> PeerProcess::Start(
    const std::vector<std::string>& args) {
  int to_child[2];
  int from_child[2];
  if (pipe2(to_child, O_CLOEXEC) != 0) return absl::InternalError("pipe2 failed");
  if (pipe2(from_child, O_CLOEXEC) != 0) {
    close(to_child[0]);
    close(to_child[1]);
    return absl::InternalError("pipe2 failed");
  }
  std::vector<std::string> argv_storage;
  argv_storage.push_back(SKV_TRANSPORT_PEER_BINARY);
  argv_storage.insert(argv_storage.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& arg : argv_storage) argv.push_back(arg.data());
  argv.push_back(nullptr);

  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0) return absl::InternalError(absl::StrCat("fork failed: ", std::strerror(errno)));
  if (pid == 0) {
    // Child: only async-signal-safe calls until exec. Die with the test if it dies first.
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(126);
    dup2(to_child[0], STDIN_FILENO);
    dup2(from_child[1], STDOUT_FILENO);
    execv(argv[0], argv.data());
    _exit(127);
  }
  close(to_child[0]);
  close(from_child[1]);
  return std::unique_ptr<PeerProcess>(new PeerProcess(pid, to_child[1], from_child[0]));
}

PeerProcess::~PeerProcess() {
  if (stdin_fd_ >= 0) close(stdin_fd_);
  if (!reaped_ && !WaitForExit(absl::Seconds(3)).ok()) Kill();
  if (stdout_fd_ >= 0) close(stdout_fd_);
}

absl::StatusOr<std::string> PeerProcess::WaitForLine(std::string_view prefix,
                                                     absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  const absl::string_view wanted(prefix.data(), prefix.size());
  while (true) {
    size_t newline;
    while ((newline = buffered_.find('\n')) != std::string::npos) {
      std::string line = buffered_.substr(0, newline);
      buffered_.erase(0, newline + 1);
      if (absl::StartsWith(line, wanted)) return line.substr(prefix.size());
    }
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) {
      return absl::DeadlineExceededError(absl::StrCat("no line starting with '", wanted, "'"));
    }
    pollfd fd{.fd = stdout_fd_, .events = POLLIN, .revents = 0};
    const int ready = poll(&fd, 1, static_cast<int>(absl::ToInt64Milliseconds(left)) + 1);
    if (ready < 0 && errno != EINTR) return absl::InternalError("poll failed");
    if (ready <= 0) continue;
    char chunk[4096];
    const ssize_t got = read(stdout_fd_, chunk, sizeof(chunk));
    if (got == 0) {
      return absl::UnavailableError(absl::StrCat("peer exited before printing '", wanted, "'"));
    }
    if (got > 0) buffered_.append(chunk, static_cast<size_t>(got));
  }
}

void PeerProcess::Kill() {
  if (reaped_) return;
  kill(pid_, SIGKILL);
  int status = 0;
  waitpid(pid_, &status, 0);
  reaped_ = true;
}

absl::StatusOr<int> PeerProcess::WaitForExit(absl::Duration timeout) {
  if (reaped_) return absl::FailedPreconditionError("already reaped");
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    int status = 0;
    const pid_t done = waitpid(pid_, &status, WNOHANG);
    if (done == pid_) {
      reaped_ = true;
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    if (absl::Now() >= deadline) return absl::DeadlineExceededError("peer did not exit");
    absl::SleepFor(absl::Milliseconds(5));
  }
}

}  // namespace spectrumkv::transport::testing
