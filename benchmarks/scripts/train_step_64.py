"""Issue 3 model check: one UXNet(in_chans=1, out_chans=14) training step (fwd + bwd) at 1x1x64^3, float32,
backend "reference" vs "auto" (the C++ CPU kernels), alternating rounds in one process, medians.
Run: PYTHONPATH=. python benchmarks/scripts/train_step_64.py"""
import time, statistics, torch, uxnet_kernels as uk
from uxnet import UXNet
torch.manual_seed(0)
m = UXNet(in_chans=1, out_chans=14)
x = torch.randn(1, 1, 64, 64, 64); y = torch.randint(0, 14, (1, 64, 64, 64))
loss_fn = torch.nn.CrossEntropyLoss()
def step(backend):
    with uk.use_backend(backend):
        m.zero_grad(set_to_none=True)
        loss_fn(m(x), y).backward()
times = {"reference": [], "auto": []}
for b in times: step(b)  # warm-up
for _ in range(3):
    for b in times:
        t = time.perf_counter(); step(b); times[b].append(time.perf_counter() - t)
med = {b: statistics.median(v) for b, v in times.items()}
print({b: [round(t, 2) for t in v] for b, v in times.items()})
print(f"median reference {med['reference']:.2f} s, auto(cpu) {med['auto']:.2f} s, ratio {med['reference']/med['auto']:.2f}x")
