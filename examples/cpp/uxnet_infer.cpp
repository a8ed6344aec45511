// Runs one forward of a TorchScript UXNet (exported with `uxnet export CKPT --out model.ts --format torchscript`).
//
//   uxnet_infer MODEL.ts INPUT.bin N C D H W OUTPUT.bin
//
// INPUT.bin: N*C*D*H*W float32 values, native byte order, C-contiguous (numpy's `x.astype("float32").tofile()`).
// OUTPUT.bin: the logits, float32, C-contiguous; their shape is printed on stdout as `output shape: N K D H W`.
#include <torch/script.h>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

namespace {

int fail(const std::string& message) {
  std::cerr << "uxnet_infer: " << message << "\n";
  return 1;
}

bool read_floats(const std::string& path, std::vector<float>& values) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return false;
  const std::streamsize bytes = in.tellg();
  if (bytes != static_cast<std::streamsize>(values.size() * sizeof(float))) return false;
  in.seekg(0);
  return static_cast<bool>(in.read(reinterpret_cast<char*>(values.data()), bytes));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 9) {
    return fail("usage: uxnet_infer MODEL.ts INPUT.bin N C D H W OUTPUT.bin");
  }
  std::vector<int64_t> shape;
  for (int i = 3; i < 8; ++i) {
    char* end = nullptr;
    const long long value = std::strtoll(argv[i], &end, 10);
    if (*end != '\0' || value <= 0) return fail(std::string("bad dimension '") + argv[i] + "'");
    shape.push_back(value);
  }
  int64_t count = 1;
  for (int64_t s : shape) count *= s;

  std::vector<float> input(static_cast<size_t>(count));
  if (!read_floats(argv[2], input)) {
    return fail(std::string("cannot read ") + std::to_string(count) + " float32 values from " + argv[2]);
  }

  torch::jit::script::Module module;
  try {
    module = torch::jit::load(argv[1], torch::kCPU);
  } catch (const c10::Error& e) {
    return fail(std::string("cannot load TorchScript model ") + argv[1] + ": " + e.what_without_backtrace());
  }
  module.eval();

  torch::Tensor output;
  try {
    torch::InferenceMode guard;
    torch::Tensor x = torch::from_blob(input.data(), shape, torch::kFloat32);
    output = module.forward({x}).toTensor().to(torch::kFloat32).contiguous();
  } catch (const c10::Error& e) {
    return fail(std::string("forward failed: ") + e.what_without_backtrace());
  }

  std::ofstream out(argv[8], std::ios::binary);
  out.write(reinterpret_cast<const char*>(output.data_ptr<float>()),
            static_cast<std::streamsize>(output.numel() * sizeof(float)));
  if (!out) return fail(std::string("cannot write ") + argv[8]);

  std::cout << "output shape:";
  for (int64_t s : output.sizes()) std::cout << " " << s;
  std::cout << "\n";
  return 0;
}
