// skv-transport-peer: a minimal daemon for the cross-process transport tests. It listens or
// connects with UcxTransport, echoes every message back to its sender, and reports on stdout:
//   LISTENING <host:port>        CONNECTED <peer id> <daemon id>     CONNECT_FAILED <code> <msg>
//   UP <peer id> <daemon id>     DOWN <peer id> <code>
// It exits when its stdin closes (the test ends it that way) or after --max-lifetime-ms.
#include <poll.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <iostream>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "spectrumkv/transport/transport.h"
#include "spectrumkv/transport/ucx_transport.h"

namespace {

using spectrumkv::transport::PeerEvent;
using spectrumkv::transport::PeerEventKind;
using spectrumkv::transport::ReceivedMessage;
using spectrumkv::transport::Transport;
using spectrumkv::transport::TransportConfig;
using spectrumkv::transport::TransportHandlers;
using spectrumkv::transport::UcxTransport;

struct PeerOptions {
  std::string listen;
  std::string connect;
  TransportConfig config;
  int64_t max_lifetime_ms = 30000;
};

void Report(const std::string& line) {
  // One write per line so the test never reads half a line from a dying process.
  const std::string out = line + "\n";
  (void)!write(STDOUT_FILENO, out.data(), out.size());
}

bool ParseOptions(int argc, char** argv, PeerOptions& options) {
  options.config.daemon_id = "peer";
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    const size_t equals = arg.find('=');
    if (arg.substr(0, 2) != "--" || equals == std::string_view::npos) return false;
    const std::string_view key = arg.substr(2, equals - 2);
    const std::string value(arg.substr(equals + 1));
    if (key == "listen") {
      options.listen = value;
    } else if (key == "connect") {
      options.connect = value;
    } else if (key == "token") {
      options.config.auth_token = value;
    } else if (key == "daemon-id") {
      options.config.daemon_id = value;
    } else if (key == "protocol-version") {
      if (!absl::SimpleAtoi(value, &options.config.protocol_version)) return false;
    } else if (key == "max-lifetime-ms") {
      if (!absl::SimpleAtoi(value, &options.max_lifetime_ms)) return false;
    } else {
      return false;
    }
  }
  return options.listen.empty() != options.connect.empty();
}

// Blocks until stdin reaches EOF or the lifetime runs out.
void WaitForEndOfInput(int64_t max_lifetime_ms) {
  const absl::Time deadline = absl::Now() + absl::Milliseconds(max_lifetime_ms);
  char buffer[256];
  while (absl::Now() < deadline) {
    pollfd fd{.fd = STDIN_FILENO, .events = POLLIN, .revents = 0};
    if (poll(&fd, 1, 100) > 0 && read(STDIN_FILENO, buffer, sizeof(buffer)) <= 0) return;
  }
}

}  // namespace

int main(int argc, char** argv) {
  PeerOptions options;
  if (!ParseOptions(argc, argv, options)) {
    std::cerr << "usage: skv-transport-peer (--listen=HOST:PORT | --connect=HOST:PORT) "
                 "--token=T [--daemon-id=ID] [--protocol-version=N] [--max-lifetime-ms=N]\n";
    return 64;
  }
  if (!options.listen.empty()) options.config.listen_address = options.listen;
  // stdout carries the report lines; logs go to stderr so they never fill the test's pipe.
  spdlog::set_default_logger(spdlog::stderr_color_mt("skv-transport-peer"));

  auto created = UcxTransport::Create(options.config);
  if (!created.ok()) {
    Report("ERROR " + created.status().ToString());
    return 1;
  }
  std::unique_ptr<Transport> transport = std::move(*created);
  Transport* raw = transport.get();
  const absl::Status handlers_set = transport->SetHandlers(TransportHandlers{
      .on_message =
          [raw](ReceivedMessage message) {
            // Runs on the transport thread, so Send() never blocks here; a full budget drops
            // the echo, which the tests avoid by keeping their own window small.
            const absl::Status echoed =
                raw->Send(message.peer, message.type, std::move(message.payload), nullptr);
            if (!echoed.ok()) spdlog::warn("echo failed: {}", echoed.ToString());
          },
      .on_peer_event =
          [](const PeerEvent& event) {
            if (event.kind == PeerEventKind::kUp) {
              Report("UP " + std::to_string(event.peer.id) + " " + event.peer.daemon_id);
            } else if (event.kind == PeerEventKind::kDown) {
              Report("DOWN " + std::to_string(event.peer.id) + " " +
                     std::string(absl::StatusCodeToString(event.status.code())));
            }
          },
  });
  if (!handlers_set.ok()) return 1;

  if (!options.listen.empty()) {
    auto bound = transport->Listen();
    if (!bound.ok()) {
      Report("ERROR " + bound.status().ToString());
      return 1;
    }
    Report("LISTENING " + *bound);
  } else {
    auto peer = transport->Connect(options.connect);
    if (!peer.ok()) {
      Report("CONNECT_FAILED " + std::string(absl::StatusCodeToString(peer.status().code())) + " " +
             std::string(peer.status().message()));
      return 2;
    }
    Report("CONNECTED " + std::to_string(peer->id) + " " + peer->daemon_id);
  }
  WaitForEndOfInput(options.max_lifetime_ms);
  transport->Close();
  return 0;
}
