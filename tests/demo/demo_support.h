// Helpers shared by the end-to-end tests in this folder.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>

namespace skv::testing {

// The shared model data: SKV_DATA_DIR from the environment, else the build's default.
inline std::string SharedDataDir() {
  const char* env = std::getenv("SKV_DATA_DIR");
  return env != nullptr && *env != '\0' ? env : SKV_TEST_DATA_DIR;
}

// Runs a shell command; returns its stdout, and its wait status in *status (-1: not started).
inline std::string RunCommand(const std::string& command, int* status) {
  std::string out;
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) {
    *status = -1;
    return out;
  }
  char buf[4096];
  for (size_t n; (n = fread(buf, 1, sizeof(buf), pipe)) > 0;) out.append(buf, n);
  *status = pclose(pipe);
  return out;
}

}  // namespace skv::testing
