#include "process_sockets.h"

#include <dirent.h>
#include <sys/stat.h>

#include <cstdlib>

namespace spectrumkv::transport::internal {

std::vector<SocketFd> ProcessSockets() {
  std::vector<SocketFd> sockets;
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return sockets;
  const int own = dirfd(dir);
  while (const dirent* entry = readdir(dir)) {
    char* end = nullptr;
    const long fd = std::strtol(entry->d_name, &end, 10);
    if (end == entry->d_name || *end != '\0' || fd == own) continue;
    struct stat st {};
    if (fstat(int(fd), &st) != 0 || !S_ISSOCK(st.st_mode)) continue;
    sockets.push_back({int(fd), uint64_t(st.st_ino)});
  }
  closedir(dir);
  return sockets;
}

}  // namespace spectrumkv::transport::internal
