#include "spectrumkv/control/metrics.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"
#include "prometheus/text_serializer.h"

namespace skv::control {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

// A minimal HTTP/1.0 client: the test must not depend on curl or on the exposer's own code.
std::string HttpGet(uint16_t port, const std::string& path) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return "socket failed";
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(port);
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
    ::close(fd);
    return "connect failed";
  }
  const std::string request = "GET " + path + " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
  size_t sent = 0;
  while (sent < request.size()) {
    const ssize_t n = ::send(fd, request.data() + sent, request.size() - sent, 0);
    if (n <= 0) break;
    sent += static_cast<size_t>(n);
  }
  std::string response;
  char buffer[4096];
  for (ssize_t n; (n = ::recv(fd, buffer, sizeof(buffer), 0)) > 0;) {
    response.append(buffer, static_cast<size_t>(n));
  }
  ::close(fd);
  return response;
}

// `n` HTTP/1.1 GETs of `path` on one kept-alive connection; how many were answered 200.
int KeptAliveGets(uint16_t port, const std::string& path, int n) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return 0;
  timeval timeout{.tv_sec = 5, .tv_usec = 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(port);
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  int ok = 0;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0) {
    std::string pending;
    for (int i = 0; i < n; ++i) {
      const std::string request = "GET " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
      if (::send(fd, request.data(), request.size(), MSG_NOSIGNAL) != ssize_t(request.size()))
        break;
      // Read the head, then exactly Content-Length bytes of body.
      size_t head_end;
      char buffer[4096];
      while ((head_end = pending.find("\r\n\r\n")) == std::string::npos) {
        const ssize_t got = ::recv(fd, buffer, sizeof(buffer), 0);
        if (got <= 0) break;
        pending.append(buffer, size_t(got));
      }
      if (head_end == std::string::npos) break;
      const std::string head = pending.substr(0, head_end);
      const size_t length_at = head.find("Content-Length: ");
      if (length_at == std::string::npos) break;
      const size_t length = std::stoul(head.substr(length_at + 16));
      while (pending.size() < head_end + 4 + length) {
        const ssize_t got = ::recv(fd, buffer, sizeof(buffer), 0);
        if (got <= 0) break;
        pending.append(buffer, size_t(got));
      }
      if (pending.size() < head_end + 4 + length) break;
      if (head.find(" 200 ") != std::string::npos) ++ok;
      pending.erase(0, head_end + 4 + length);
    }
  }
  ::close(fd);
  return ok;
}

// Body lines of a /metrics response, without comments.
std::set<std::string> SeriesLines(const std::string& response) {
  const size_t body = response.find("\r\n\r\n");
  std::set<std::string> lines;
  std::istringstream in(body == std::string::npos ? "" : response.substr(body + 4));
  for (std::string line; std::getline(in, line);) {
    if (!line.empty() && line.front() != '#') lines.insert(line);
  }
  return lines;
}

// One endpoint for the whole scrape test: civetweb (1.15) can take up to 2 s to stop, so each
// extra endpoint lifetime would cost that much test time.
TEST(MetricsEndpointTest, ScrapeShowsEveryFamilyAndRecordedValues) {
  Metrics metrics;
  auto started = MetricsHttpEndpoint::Start("127.0.0.1:0", metrics);
  ASSERT_TRUE(started.ok()) << started.status();
  const std::unique_ptr<MetricsHttpEndpoint> endpoint = *std::move(started);
  ASSERT_NE(endpoint->port(), 0);
  EXPECT_EQ(KeptAliveGets(endpoint->port(), "/metrics", 3), 3)
      << "a keep-alive scraper gets every answer";

  // ---- Before anything is recorded: every fixed-label family is there, at zero.
  const std::string initial = HttpGet(endpoint->port(), "/metrics");
  ASSERT_THAT(initial, HasSubstr("200 OK"));
  for (const char* type_line :
       {"# TYPE spectrumkv_transfer_duration_seconds histogram",
        "# TYPE spectrumkv_bytes_total counter", "# TYPE spectrumkv_budget_ratio histogram",
        "# TYPE spectrumkv_tokens_total counter", "# TYPE spectrumkv_transfers_total counter",
        "# TYPE spectrumkv_transfers_in_flight gauge",
        "# TYPE spectrumkv_passthrough_total counter"}) {
    EXPECT_THAT(initial, HasSubstr(type_line));
  }
  // Per-peer and per-model families have no series until first use (and Prometheus text
  // format omits empty families).
  EXPECT_THAT(initial, Not(HasSubstr("spectrumkv_peer_up")));
  EXPECT_THAT(initial, Not(HasSubstr("spectrumkv_int4_enabled")));
  const auto initial_lines = SeriesLines(initial);
  for (const std::string& expected : std::vector<std::string>{
           "spectrumkv_bytes_total{kind=\"wire\"} 0",
           "spectrumkv_tokens_total{tier=\"drop\"} 0",
           "spectrumkv_passthrough_total{reason=\"fast_link\"} 0",
           "spectrumkv_transfers_total{result=\"data_loss\",role=\"receiver\"} 0",
           "spectrumkv_transfer_duration_seconds_count{phase=\"commit\",role=\"sender\"} 0",
           "spectrumkv_transfers_in_flight 0",
       }) {
    EXPECT_TRUE(initial_lines.contains(expected)) << "missing: " << expected;
  }

  // ---- Record, scrape again, compare exact series.
  TransferPhaseTimes times;
  times.encode = absl::Microseconds(300);  // lands in le=0.0005 and above
  times.total = absl::Seconds(2);
  metrics.ObserveTransfer(TransferRole::kSender, times);
  metrics.ObservePhase(TransferRole::kReceiver, TransferPhase::kDecode, absl::Seconds(90));
  metrics.AddBytes(1000, 420);
  metrics.AddBytes(24, 4);
  metrics.ObserveBudget(0.5, 0.42);
  metrics.AddTokens(skv::Tier::kInt4, 7);
  metrics.AddTokens(skv::Tier::kFp16, 3);
  metrics.TransferFinished(TransferRole::kSender, absl::StatusCode::kOk);
  metrics.TransferFinished(TransferRole::kReceiver, absl::StatusCode::kInvalidArgument);
  metrics.TransferFinished(TransferRole::kReceiver, absl::StatusCode::kInvalidArgument);
  metrics.CountPassthrough(PassthroughReason::kBudgetFull);
  metrics.SetPeerUp("decode-0", true);
  metrics.SetPeerUp("decode-1", false);
  metrics.SetLinkBandwidth("decode-0", 1.25e9);
  metrics.SetInt4Enabled("qwen2.5-7b", false);
  metrics.SetInt4Enabled("mistral-7b", true);
  auto guard_a = metrics.TrackInFlight();
  { auto guard_b = metrics.TrackInFlight(); }

  const std::string after = HttpGet(endpoint->port(), "/metrics");
  EXPECT_THAT(after, HasSubstr("# TYPE spectrumkv_peer_up gauge"));
  EXPECT_THAT(after, HasSubstr("# TYPE spectrumkv_link_bandwidth_bytes_per_second gauge"));
  EXPECT_THAT(after, HasSubstr("# TYPE spectrumkv_int4_enabled gauge"));
  const auto lines = SeriesLines(after);
  const std::string sender_encode = "phase=\"encode\",role=\"sender\"";
  for (const std::string& expected : std::vector<std::string>{
           "spectrumkv_bytes_total{kind=\"raw\"} 1024",
           "spectrumkv_bytes_total{kind=\"wire\"} 424",
           "spectrumkv_transfer_duration_seconds_count{" + sender_encode + "} 1",
           "spectrumkv_transfer_duration_seconds_sum{" + sender_encode + "} 0.0003",
           "spectrumkv_transfer_duration_seconds_bucket{" + sender_encode + ",le=\"0.00025\"} 0",
           "spectrumkv_transfer_duration_seconds_bucket{" + sender_encode + ",le=\"0.0005\"} 1",
           "spectrumkv_transfer_duration_seconds_bucket{" + sender_encode + ",le=\"60\"} 1",
           "spectrumkv_transfer_duration_seconds_count{phase=\"total\",role=\"sender\"} 1",
           "spectrumkv_transfer_duration_seconds_count{phase=\"score\",role=\"sender\"} 0",
           // 90 s is beyond the last finite bucket.
           "spectrumkv_transfer_duration_seconds_bucket{phase=\"decode\",role=\"receiver\","
           "le=\"60\"} 0",
           "spectrumkv_transfer_duration_seconds_bucket{phase=\"decode\",role=\"receiver\","
           "le=\"+Inf\"} 1",
           "spectrumkv_budget_ratio_bucket{kind=\"achieved\",le=\"0.4\"} 0",
           "spectrumkv_budget_ratio_bucket{kind=\"achieved\",le=\"0.45\"} 1",
           "spectrumkv_budget_ratio_bucket{kind=\"requested\",le=\"0.5\"} 1",
           "spectrumkv_budget_ratio_sum{kind=\"requested\"} 0.5",
           "spectrumkv_tokens_total{tier=\"int4\"} 7",
           "spectrumkv_tokens_total{tier=\"fp16\"} 3",
           "spectrumkv_transfers_total{result=\"ok\",role=\"sender\"} 1",
           "spectrumkv_transfers_total{result=\"invalid_argument\",role=\"receiver\"} 2",
           "spectrumkv_transfers_total{result=\"ok\",role=\"receiver\"} 0",
           "spectrumkv_passthrough_total{reason=\"budget_full\"} 1",
           "spectrumkv_peer_up{peer=\"decode-0\"} 1",
           "spectrumkv_peer_up{peer=\"decode-1\"} 0",
           "spectrumkv_link_bandwidth_bytes_per_second{peer=\"decode-0\"} 1250000000",
           "spectrumkv_int4_enabled{model=\"qwen2.5-7b\"} 0",
           "spectrumkv_int4_enabled{model=\"mistral-7b\"} 1",
           "spectrumkv_transfers_in_flight 1",
       }) {
    EXPECT_TRUE(lines.contains(expected)) << "missing: " << expected;
  }

  // ---- The port is taken now: a second endpoint on it must fail cleanly.
  auto clash = MetricsHttpEndpoint::Start("127.0.0.1:" + std::to_string(endpoint->port()), metrics);
  EXPECT_EQ(clash.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(clash.status().message(), HasSubstr("metrics_listen_address"));
}

TEST(MetricsTest, LabelsAndBuckets) {
  EXPECT_EQ(TransferResultLabel(absl::StatusCode::kOk), "ok");
  EXPECT_EQ(TransferResultLabel(absl::StatusCode::kDeadlineExceeded), "deadline_exceeded");
  EXPECT_EQ(TransferResultLabel(absl::StatusCode::kUnauthenticated), "unauthenticated");
  EXPECT_EQ(TransferResultLabel(static_cast<absl::StatusCode>(99)), "unknown");
  EXPECT_EQ(TransferRoleLabel(TransferRole::kReceiver), "receiver");
  EXPECT_EQ(TransferPhaseLabel(TransferPhase::kWire), "wire");
  EXPECT_EQ(TierLabel(skv::Tier::kInt2), "int2");
  EXPECT_EQ(PassthroughReasonLabel(PassthroughReason::kForced), "forced");

  const auto seconds = Metrics::DurationBucketsSeconds();
  EXPECT_DOUBLE_EQ(seconds.front(), 1e-4);
  EXPECT_DOUBLE_EQ(seconds.back(), 60);
  EXPECT_TRUE(std::is_sorted(seconds.begin(), seconds.end()));
  const auto ratios = Metrics::BudgetRatioBuckets();
  EXPECT_DOUBLE_EQ(ratios.back(), 1.0);
  EXPECT_GT(ratios.front(), 0.0);
}

TEST(MetricsTest, TransportCountersAdvanceByTheirDifference) {
  Metrics m;
  TransportCounters t;
  t.messages_sent = 10;
  t.handshakes_rejected_auth = 2;
  t.abandoned_connections_closed = 7;
  t.peers_up = 3;
  m.SetTransportCounters(t);
  t.messages_sent = 15;
  m.SetTransportCounters(t);
  m.SetTransportCounters(t);  // unchanged: no double count
  const std::string text = prometheus::TextSerializer().Serialize(m.registry()->Collect());
  EXPECT_NE(text.find("spectrumkv_transport_messages_total{direction=\"sent\"} 15"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("spectrumkv_transport_handshakes_total{result=\"rejected_auth\"} 2"),
            std::string::npos);
  EXPECT_NE(text.find("spectrumkv_transport_abandoned_connections_total 7"), std::string::npos);
  EXPECT_NE(text.find("spectrumkv_transport_peers 3"), std::string::npos);
}

TEST(MetricsTest, UnbindableAddressIsAnError) {
  Metrics metrics;
  EXPECT_FALSE(MetricsHttpEndpoint::Start("", metrics).ok());
  EXPECT_EQ(MetricsHttpEndpoint::Start("192.0.2.1:0", metrics).status().code(),
            absl::StatusCode::kUnavailable);  // TEST-NET address: not local
}

}  // namespace
}  // namespace skv::control
