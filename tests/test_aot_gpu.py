"""AOT compilation for GPU targets (`unipic-jax compile --topology h100`, `unipic_jax.aot`).

Without the CUDA plugin (CI has none): the preset names, the target configs as jaxlib 0.10.2 reads
them, when attention takes cuDNN's kernel, and the command's install hint. With the plugin and
cuDNN (`pip install -e ".[gpu-aot]"`; no GPU or driver needed, run with JAX_PLATFORMS=cpu): the
compile-only devices, the fixture-size sampler compiled for one H100 (cuDNN's attention kernels,
memory lines, no FLOPs) and a program larger than the card reported as not fitting.
"""

import importlib.util

import jax
import jax.numpy as jnp
import pytest
from conftest import FIXTURE_ROOT

from unipic_jax import aot, cli
from unipic_jax.models import attention

HAS_CUDA_PLUGIN = all(importlib.util.find_spec(m) is not None for m in ("jax_cuda12_plugin", "nvidia.cudnn"))
needs_cuda_plugin = pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason='CUDA plugin not installed (pip install -e ".[gpu-aot]")')
FIXTURE = str(FIXTURE_ROOT / "unipic")
SMALL = ["--config", FIXTURE, "--resolution", "64", "--num-iter", "4"]


@pytest.mark.parametrize("name, want", [
    ("h100", ("h100", "h100_sxm.txtpb", 1, None)),
    ("H100x8", ("h100", "h100_sxm.txtpb", 8, None)),
    ("a100", ("a100", "a100_sxm_80.txtpb", 1, None)),
    ("gpu24x2", ("gpu24", "a6000.txtpb", 2, 24 * aot.GIB)),
])
def test_gpu_preset_names(name, want):
    spec = aot.parse_topology(name)
    assert (spec.name, spec.config_file, spec.devices, spec.memory_bytes) == want


@pytest.mark.parametrize("name", ["h100x0", "h100x9", "h100x", "rtx4090", "gpu24:2"])
def test_bad_gpu_names_are_rejected(name):
    with pytest.raises(ValueError, match="topology"):
        aot.parse_topology(name)


def test_gpu_presets_are_one_host():
    with pytest.raises(ValueError, match="one host"):
        aot.parse_topology("h100", num_slices=2)


def test_target_configs_as_jaxlib_reads_them():
    h100, gpu24 = aot.parse_topology("h100"), aot.parse_topology("gpu24")
    assert h100.device_memory == 84942979072  # openxla/xla specs/h100_sxm.txtpb
    assert gpu24.device_memory == 24 * aot.GIB and "NVIDIA RTX A6000" in gpu24.config_text()
    for field in ("device_interconnect_info", "collective_memory_granularity", "mem_clock_ghz"):
        assert field in (aot.GPU_TARGETS_DIR / "h100_sxm.txtpb").read_text()
        assert field not in h100.config_text()


@pytest.mark.parametrize("platform, dtype, head_dim, lengths, masked, want", [
    ("cuda", jnp.bfloat16, 80, (4160, 4160), True, True),  # MAR at 1024 px
    ("cuda", jnp.bfloat16, 128, (4160, 4224), True, True),  # the LLM
    ("cuda", jnp.float16, 72, (7, 7), False, True),
    ("cuda", jnp.float32, 80, (8, 8), False, False),
    ("cuda", jnp.bfloat16, 256, (8, 8), False, False),
    ("cuda", jnp.bfloat16, 76, (8, 8), False, False),
    ("cuda", jnp.bfloat16, 64, (7, 8), True, False),  # a mask (bias) wants even lengths
    ("gpu", jnp.bfloat16, 64, (8, 8), False, False),  # ROCm's name too
    ("tpu", jnp.bfloat16, 64, (8, 8), False, False),
    ("cpu", jnp.bfloat16, 64, (8, 8), False, False),
])
def test_when_attention_takes_cudnn(platform, dtype, head_dim, lengths, masked, want):
    q = jax.ShapeDtypeStruct((2, lengths[0], 4, head_dim), dtype)
    k = jax.ShapeDtypeStruct((2, lengths[1], 4, head_dim), dtype)
    mask = jax.ShapeDtypeStruct((2, 1, 1, lengths[1]), bool) if masked else None
    with attention.target(platform):
        assert attention._cudnn_applies(q, k, mask) is want


def test_compile_without_cuda_plugin_says_how_to_install(capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "jax_cuda12_plugin"
                        else find_spec(name, *a))
    assert cli.main(["compile", "--topology", "h100", *SMALL]) == 2
    err = capsys.readouterr().err
    assert 'pip install "jax-cuda12-plugin==0.10.2"' in err and len(err.strip().splitlines()) == 1


@needs_cuda_plugin
def test_preset_builds_compile_only_devices():
    devices = aot.topology_devices(aot.parse_topology("gpu24x2"))
    assert [d.device_kind for d in devices] == ["NVIDIA RTX A6000"] * 2 and devices[0].platform == "gpu"


@needs_cuda_plugin
def test_sampler_compiles_for_h100(capsys):
    assert cli.main(["compile", "--topology", "h100", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "GPU target h100: 1 NVIDIA H100 80GB HBM3 device(s) with 79.109 GiB each" in out
    assert out.count("per chip: total") == 2 and out.count("device memory 79.109 GiB: fits") == 2
    assert "flops: not reported" in out
    assert "__cudnn$fmha" in out  # bf16 attention lowered to cuDNN's kernel, not XLA's


@needs_cuda_plugin
def test_program_larger_than_the_card_does_not_fit(capsys, monkeypatch):
    monkeypatch.setitem(aot.GPU_PRESETS, "gpu24", ("a6000.txtpb", 2 ** 20))  # a 1 MiB card
    assert cli.main(["compile", "--topology", "gpu24", *SMALL]) == 3
    captured = capsys.readouterr()
    assert "device memory 1.00 MiB: does not fit" in captured.out
    assert captured.out.count("per chip: total") == 2  # both programs reported before the verdict
    err = captured.err.strip()
    assert "\n" not in err and "does not fit in device memory" in err
