#include "source_filter.h"

#include <arpa/inet.h>
#include <linux/filter.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace spectrumkv::transport::internal {
namespace {

int AddressBytes(int family) { return family == AF_INET ? 4 : 16; }

// Bits [32 * word, 32 * word + 32) of a prefix's mask, as BPF compares them (big-endian words).
uint32_t MaskWord(int prefix_length, int word) {
  const int bits = std::clamp(prefix_length - 32 * word, 0, 32);
  return bits == 0 ? 0 : uint32_t(0xffffffffu << (32 - bits));
}

uint32_t AddressWord(const NetworkPrefix& p, int word) {
  const uint8_t* b = p.address.data() + 4 * word;
  return uint32_t(b[0]) << 24 | uint32_t(b[1]) << 16 | uint32_t(b[2]) << 8 | uint32_t(b[3]);
}

sock_filter Statement(uint16_t code, uint32_t k) { return BPF_STMT(code, k); }
sock_filter Jump(uint16_t code, uint32_t k, uint8_t jt, uint8_t jf) {
  return BPF_JUMP(code, k, jt, jf);
}

// Appends one prefix test: falls through to the next test when the source is outside `p`, jumps to
// `accept` (an index patched in by the caller through `accept_jumps`) when inside.
void AppendPrefixTest(const NetworkPrefix& p, std::vector<sock_filter>& program,
                      std::vector<size_t>& accept_jumps) {
  // Offset of the source address in the IPv4 and IPv6 headers.
  const uint32_t source_offset = p.family == AF_INET ? 12 : 8;
  const int words = (p.prefix_length + 31) / 32;
  for (int w = 0; w < words; ++w) {
    const uint8_t remaining =
        uint8_t(3 * (words - 1 - w) + 1);  // the rest of this test, then its `ja`
    program.push_back(
        Statement(BPF_LD | BPF_W | BPF_ABS, uint32_t(SKF_NET_OFF) + source_offset + 4 * w));
    program.push_back(Statement(BPF_ALU | BPF_AND | BPF_K, MaskWord(p.prefix_length, w)));
    program.push_back(Jump(BPF_JMP | BPF_JEQ | BPF_K, AddressWord(p, w), 0, remaining));
  }
  accept_jumps.push_back(program.size());
  program.push_back(Statement(BPF_JMP | BPF_JA, 0));
}

void AppendTests(int family, const std::vector<NetworkPrefix>& allowed,
                 std::vector<sock_filter>& program, std::vector<size_t>& accept_jumps) {
  for (const NetworkPrefix& p : allowed) {
    if (p.family == family) AppendPrefixTest(p, program, accept_jumps);
  }
  program.push_back(Statement(BPF_RET | BPF_K, 0));  // drop
}

}  // namespace

std::string NetworkPrefix::ToString() const {
  char text[INET6_ADDRSTRLEN] = {};
  inet_ntop(family, address.data(), text, sizeof(text));
  return absl::StrCat(text, "/", prefix_length);
}

absl::StatusOr<NetworkPrefix> ParseNetworkPrefix(absl::string_view text) {
  const auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat("'", text, "' is not a network: ", why));
  };
  const size_t slash = text.find('/');
  const std::string host(text.substr(0, slash));
  NetworkPrefix p;
  if (inet_pton(AF_INET, host.c_str(), p.address.data()) == 1) {
    p.family = AF_INET;
  } else if (inet_pton(AF_INET6, host.c_str(), p.address.data()) == 1) {
    p.family = AF_INET6;
  } else {
    return bad(
        "expected an IPv4 or IPv6 address, optionally with /prefix-length (10.0.0.0/8, fd00::/8)");
  }
  const int max_length = 8 * AddressBytes(p.family);
  p.prefix_length = max_length;
  if (slash != absl::string_view::npos &&
      (!absl::SimpleAtoi(text.substr(slash + 1), &p.prefix_length) || p.prefix_length < 0 ||
       p.prefix_length > max_length)) {
    return bad(absl::StrCat("the prefix length must be 0 to ", max_length));
  }
  for (int bit = p.prefix_length; bit < max_length; ++bit) {
    if (p.address[bit / 8] & (0x80 >> (bit % 8))) {
      NetworkPrefix network = p;
      for (int b = p.prefix_length; b < max_length; ++b)
        network.address[b / 8] &= uint8_t(~(0x80 >> (b % 8)));
      return bad(absl::StrCat("host bits are set (did you mean ", network.ToString(), "?)"));
    }
  }
  return p;
}

std::set<SocketFd> ListeningTcpSockets() {
  std::set<SocketFd> listening;
  for (const SocketFd& s : ProcessSockets()) {
    int accepts = 0, protocol = 0;
    socklen_t len = sizeof(int);
    if (getsockopt(s.fd, SOL_SOCKET, SO_ACCEPTCONN, &accepts, &len) != 0 || accepts == 0) continue;
    len = sizeof(int);
    if (getsockopt(s.fd, SOL_SOCKET, SO_PROTOCOL, &protocol, &len) != 0 ||
        protocol != IPPROTO_TCP) {
      continue;
    }
    listening.insert(s);
  }
  return listening;
}

std::vector<int> NewListeningSockets(const std::set<SocketFd>& before,
                                     const std::set<SocketFd>& after) {
  std::vector<int> fresh;
  for (const SocketFd& s : after) {
    if (!before.contains(s)) fresh.push_back(s.fd);
  }
  return fresh;
}

absl::Status AttachSourceFilter(int fd, const std::vector<NetworkPrefix>& allowed) {
  if (allowed.empty() || allowed.size() > kMaxAllowedNetworks) {
    return absl::InvalidArgumentError(
        absl::StrCat("1 to ", kMaxAllowedNetworks, " allowed networks"));
  }
  int domain = 0;
  socklen_t len = sizeof(domain);
  if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0 ||
      (domain != AF_INET && domain != AF_INET6)) {
    return absl::InvalidArgumentError(absl::StrCat("fd ", fd, " is not an IPv4 or IPv6 socket"));
  }
  std::vector<sock_filter> program;
  std::vector<size_t> accept_jumps;
  if (domain == AF_INET6) {
    // An IPv6 socket also receives IPv4 packets (v4-mapped): branch on the IP version nibble.
    program.push_back(Statement(BPF_LD | BPF_B | BPF_ABS, uint32_t(SKF_NET_OFF)));
    program.push_back(Statement(BPF_ALU | BPF_RSH | BPF_K, 4));
    program.push_back(Jump(BPF_JMP | BPF_JEQ | BPF_K, 4, 0, 1));
    const size_t to_ipv4 = program.size();
    program.push_back(Statement(BPF_JMP | BPF_JA, 0));
    AppendTests(AF_INET6, allowed, program, accept_jumps);
    program[to_ipv4].k = uint32_t(program.size() - to_ipv4 - 1);
  }
  AppendTests(AF_INET, allowed, program, accept_jumps);
  const size_t accept = program.size();
  program.push_back(Statement(BPF_RET | BPF_K, 0xffffffffu));  // keep the whole packet
  for (size_t at : accept_jumps) program[at].k = uint32_t(accept - at - 1);
  if (program.size() > BPF_MAXINSNS) {
    return absl::InvalidArgumentError(absl::StrCat("too many allowed networks: ", program.size(),
                                                   " BPF instructions, the kernel takes ",
                                                   BPF_MAXINSNS));
  }
  sock_fprog fprog{uint16_t(program.size()), program.data()};
  if (setsockopt(fd, SOL_SOCKET, SO_ATTACH_FILTER, &fprog, sizeof(fprog)) != 0) {
    return absl::InternalError(
        absl::StrCat("SO_ATTACH_FILTER on fd ", fd, ": ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

}  // namespace spectrumkv::transport::internal
