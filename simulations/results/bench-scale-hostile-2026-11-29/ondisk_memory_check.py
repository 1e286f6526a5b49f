"""Peak RSS of FedMedian's on-disk aggregate: 10 vs 60 updates of a 4M-parameter model."""
import sys, tempfile
from pathlib import Path
import numpy as np
from flwr.app import Array, ArrayRecord
from server.validation import UpdateStore
from server.strategies import _by_chunk

def hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024

def reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

n, mode = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(0)
names = [f"a{i}" for i in range(4)]
with tempfile.TemporaryDirectory(dir="/tmp") as folder:
    store = UpdateStore(Path(folder), names)
    for k in range(n):
        record = ArrayRecord({name: Array(rng.normal(size=1_000_000).astype(np.float32)) for name in names})
        store.add(k, record)
        del record
    models = [store.load(k) for k in range(n)]
    if mode == "mmap":
        class M:
            def __init__(self, a): self.a = np.load(a.path, mmap_mode="r"); self.size = a.size; self.shape = a.shape
            def read(self, start, count): return np.asarray(self.a.reshape(-1)[start:start+count])
        models = [{k: M(v) for k, v in m.items()} for m in models]
    reset(); base = hwm_mb()
    out = _by_chunk(models, lambda b: np.median(b, axis=0))
    print(f"{mode} n={n}: peak RSS during the aggregate {hwm_mb() - base:.0f} MB above {base:.0f} MB")
