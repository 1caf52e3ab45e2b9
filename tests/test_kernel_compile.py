"""benchmarks/kernel_compile.py without the accelerator compilers: its shape sets and report parsing.

The compiles themselves need the AOT venvs (.ci/aot_env.sh); see the script's docstring.
"""

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
  spec = importlib.util.spec_from_file_location("kernel_compile", os.path.join(REPO, "benchmarks", "kernel_compile.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_shapes_cover_the_paper_table_and_quick_is_one_per_target():
  kc = _module()
  assert kc.M == 2**20 and kc.BAGS == 8192
  assert {(d, dt, bag) for d, dt, bag in kc.FULL_SHAPES} == {
      (d, dt, bag) for d in (1024, 2048, 4096) for dt in ("float32", "bfloat16") for bag in (128, 256)}
  assert len(kc.QUICK_SHAPES) == 1
  assert {t for t, (p, _, _) in kc.TARGETS.items() if p == "tpu"} == {"v5e", "v5p", "v6e"}
  for platform, name, _ in kc.TARGETS.values():
    if platform == "cuda":
      assert os.path.exists(os.path.join(REPO, "memjax", "scale", "targets", name))


def test_gpu_report_reads_the_thunk_sequence(tmp_path):
  kc = _module()
  (tmp_path / "module_0001.jit_f.thunk_metadata.txt").write_text("")
  (tmp_path / "module_0001.jit_f.thunk_sequence.txt").write_text(
      "001: kCustomKernel [source | sink] memjax_bag_forward grid: [8192, 4, 1] threads: [128, 1, 1]  "
      "shared_memory: 2048 bytes\n")
  report = kc._gpu_report(str(tmp_path))
  assert report["memjax_bag_forward"]["shared_memory_bytes"] == 2048
  assert report["memjax_bag_forward"]["grid"] == "8192, 4, 1"


def test_table_line_names_errors_and_sizes():
  kc = _module()
  row = {"target": "v5p", "kernel": "forward", "value_dim": 1024, "dtype": "bfloat16", "bag_size": 128,
         "status": "ok", "argument_bytes": 2**31, "output_bytes": 2**25, "temp_bytes": 9 * 2**20,
         "compile_seconds": 7.0, "roofline_seconds": 1.57e-3, "optimal_seconds": 1.87e-3}
  line = kc._line(row)
  assert "temp    9.0 MiB" in line and "roofline    1.57 ms" in line and "1.87 ms" in line
  err = kc._line({**row, "status": "error", "error": "RESOURCE_EXHAUSTED: Ran out of memory"})
  assert "ERROR RESOURCE_EXHAUSTED" in err
