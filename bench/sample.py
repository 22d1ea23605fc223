"""Benchmark one text-to-image sample: compile time, steady-state time, programs, peak memory.

    python bench/sample.py --config bench/cpu_bench.json --threads 2 --repeats 5 --dtype fp32
    python bench/sample.py --config unipic_1p5b --random-weights --size 1024 --steps 64 --dtype bf16

`--config` is a CPU-bench JSON (the mid-size architecture the official code is timed on: the model
is built exactly from its sections, with random weights, and sampled as its `sampling` section
says: a random prompt of `prompt_len` ids and an unconditional one of `uncond_prompt_len`, both
right padded with EOS, cfg, schedule, temperature, num_iter and grid as given), "unipic_1p5b"
(the released sizes; needs --random-weights, nothing is downloaded) or a fixture folder. --size
and --steps override the grid and num_iter.

The timed call is `sampling.t2i.text_to_image` (prompt pass, every MAR step, VAE decode of the cond
rows), blocked on the images. The first call compiles; its compile share is the time XLA spent
tracing, lowering and compiling (from `jax.monitoring` events), and it is not in the median. Then
`--repeats` timed calls with the same key. Peak memory: the process's peak RSS on the CPU, the
device's `peak_bytes_in_use` on an accelerator (params included). `cpu_s_median` is the process's
CPU time per sample (all threads): on a shared machine, wall time is inflated by the others' load,
CPU time much less so.

--threads N limits the CPUs this process may run on (sched_setaffinity) before jax is imported;
XLA's CPU thread pools size themselves from the schedulable CPUs. N = 1 also turns off Eigen's
intra-op threading. The last line is `seconds_per_image=<median>`, for scripts.

Fast sampling (`sampling/fast.py`): `--fast` times the `fast` preset instead of the faithful
sampler (`--fast-settings JSON` another combination, `FastSettings.as_dict()` form). `--alternate`
compiles both and times them alternately in one process (`--repeats` each; the machine's load
then hits both alike), reporting both and `speedup` (faithful median / fast median).
`--deviation` reports how far the fast sampler's final tokens are from the faithful ones on the
same key (relative RMS), next to two faithful samples from different keys. `--flops` reports the
FLOPs per image from XLA's cost analysis instead of timing (programs lowered on shapes only, no
weights allocated, so it runs at full size on a CPU):

    python bench/sample.py --config bench/cpu_bench.json --threads 2 --repeats 5 --alternate
    python bench/sample.py --config unipic_1p5b --random-weights --size 1024 --steps 64 --flops --alternate
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def limit_threads(threads: int) -> list[int]:
    """Run on the first `threads` schedulable CPUs (call before importing jax); returns them."""
    cpus = sorted(os.sched_getaffinity(0))
    if threads < 1 or threads > len(cpus):
        raise ValueError(f"--threads {threads}: this process may use 1..{len(cpus)} CPUs")
    os.sched_setaffinity(0, cpus[:threads])
    if threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    return cpus[:threads]


def bench_model_config(doc: dict):
    """The config schema (configs/unipic_1p5b.py) filled from a CPU-bench JSON's sections."""
    from configs import fixture, unipic_1p5b

    c = unipic_1p5b.get_config()
    c.name = doc.get("name", "cpu_bench")
    c.vae.update(fixture.vae_section(doc["vae"]))
    c.vae_scale = doc["vae"]["vae_scale"]
    c.mar.update(fixture.mar_section(doc["mar"]))
    c.diffusion.update(fixture.diffusion_section(doc["mar"]))
    llm = doc["llm"]["config"]
    c.qwen2.update(fixture.qwen2_section(llm))
    c.siglip.update(fixture.siglip_section(doc["siglip2"]["tiny_config"]))  # built, never run in T2I
    c.projectors.update(dict(mar_dim=doc["mar"]["encoder_embed_dim"], llm_dim=llm["hidden_size"]))
    t = doc["tokens"]
    c.tokens.update(dict(image=t["image_token_id"], eos=t["eos_token_id"], pad=t["pad_token_id"],
                         bos=llm.get("bos_token_id", t["pad_token_id"])))
    return c


# The reference script's sampling settings; a bench JSON's `sampling` section replaces them.
DEFAULT_SAMPLING = dict(batch_images=1, prompt_len=24, uncond_prompt_len=8, prompt_seed=1234, num_iter=32,
                        cfg=3.0, cfg_schedule="constant", temperature=1.0, sample_seed=0)


def load_setup(spec: str, random_weights: bool):
    """(model config, sampling settings, image side) for `--config`."""
    from configs import fixture, unipic_1p5b

    if spec == "unipic_1p5b":
        if not random_weights:
            raise ValueError("--config unipic_1p5b times the full-size model: pass --random-weights "
                             "(weights do not change the timing; nothing is downloaded)")
        return unipic_1p5b.get_config(), dict(DEFAULT_SAMPLING), 1024
    path = Path(spec)
    if path.is_file() and path.suffix == ".json":
        doc = json.loads(path.read_text())
        if "sampling" in doc and "llm" in doc:
            sampling = {**DEFAULT_SAMPLING, **{k: doc["sampling"][k] for k in DEFAULT_SAMPLING
                                               if k in doc["sampling"]}}
            return bench_model_config(doc), sampling, doc["image"]["height"]
    if (path / "meta.json").is_file() or path.suffix == ".json":
        config = fixture.get_config(path)
        return config, dict(DEFAULT_SAMPLING), config.mar.img_size
    raise ValueError(f"--config {spec}: want a CPU-bench JSON, 'unipic_1p5b' or a fixture folder")


def bench_prompts(sampling: dict, tokens, vocab_below: int):
    """Rows `[cond x B ; uncond x B]` of random ids below `vocab_below`, right padded with EOS."""
    import numpy as np

    rng = np.random.default_rng(sampling["prompt_seed"])
    length, short, batch = sampling["prompt_len"], sampling["uncond_prompt_len"], sampling["batch_images"]
    cond, uncond = rng.integers(0, vocab_below, length), rng.integers(0, vocab_below, short)
    ids = np.full((2 * batch, length), tokens.eos, np.int32)
    mask = np.zeros((2 * batch, length), bool)
    ids[:batch], mask[:batch] = cond, True
    ids[batch:, :short], mask[batch:, :short] = uncond, True
    if sampling["cfg"] == 1.0:
        return ids[:batch], mask[:batch]
    return ids, mask


def random_params(config, seed: int, dtype):
    """Random params for timing, with scales like the reference bench's: kernels N(0, 1/fan_in),
    biases N(0, 0.1^2), norm scales 1 + N(0, 0.2^2), embeddings N(0, (2/sqrt(width))^2), free
    parameters N(0, 0.5^2). Drawn with numpy on the host and put on the device (a whole-model
    `init` would first compile the model's forward pass, minutes on a CPU)."""
    import jax
    import numpy as np

    from unipic_jax.models.unipic import param_shapes

    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name.endswith("kernel"):
            mean, scale = 0.0, float(np.prod(leaf.shape[:-1])) ** -0.5
        elif name.endswith("bias"):
            mean, scale = 0.0, 0.1
        elif name == "scale":
            mean, scale = 1.0, 0.2
        elif name == "embedding":
            mean, scale = 0.0, 2.0 / leaf.shape[-1] ** 0.5
        else:
            mean, scale = 0.0, 0.5
        values = rng.standard_normal(leaf.shape, np.float32) * np.float32(scale) + np.float32(mean)
        return jax.device_put(values.astype(dtype))

    return jax.tree_util.tree_map_with_path(draw, param_shapes(config))


def peak_memory() -> dict:
    """Peak bytes: device memory on an accelerator, process RSS on the CPU."""
    import jax

    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        return {"peak_device_bytes": int(stats["peak_bytes_in_use"])}
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def fast_settings(args):
    """The fast sampler's settings for the arguments (None: faithful only)."""
    from unipic_jax.sampling import fast

    if args.fast_settings:
        return fast.FastSettings.from_dict(json.loads(args.fast_settings))
    return fast.FAST if (args.fast or args.alternate or args.deviation) else None


def timed_modes(args) -> tuple[str, ...]:
    if args.alternate:
        return ("faithful", "fast")
    return ("fast",) if args.fast or args.fast_settings else ("faithful",)


def report_flops(args, model, config, sampling, grid, num_iter, settings, dtype) -> dict:
    """FLOPs per image of the faithful and/or fast sampler (shapes only)."""
    import jax

    from unipic_jax.models.unipic import param_shapes
    from unipic_jax.sampling import fast

    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), param_shapes(config))
    kwargs = dict(batch=sampling["batch_images"], prompt_len=sampling["prompt_len"], image_shape=grid,
                  num_iter=num_iter, cfg=sampling["cfg"])
    out = {}
    modes = [(name, mode) for name, mode in (("faithful", None), ("fast", settings)) if name in timed_modes(args)]
    for name, mode in modes:
        start = time.perf_counter()
        flops = fast.flops_per_image(model, params, fast=mode, **kwargs)
        out[f"{name}_flops_per_image"] = {k: float(f"{v:.4g}") for k, v in flops.items()}
        out[f"{name}_lower_s"] = round(time.perf_counter() - start, 1)
    if len(modes) == 2:
        out["flops_ratio"] = round(out["faithful_flops_per_image"]["total"] / out["fast_flops_per_image"]["total"], 3)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="CPU-bench JSON, 'unipic_1p5b' or a fixture folder")
    p.add_argument("--random-weights", action="store_true", help="random params (required for unipic_1p5b)")
    p.add_argument("--threads", type=int, help="CPUs for XLA on the host (default: all schedulable)")
    p.add_argument("--repeats", type=int, default=3, help="timed samples after the compiling one (default 3)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                   help="fp32, or bf16: bfloat16 compute and weights, as the reference's model.to(bf16)")
    p.add_argument("--size", type=int, help="image side in pixels (default: the config's)")
    p.add_argument("--steps", type=int, help="MAR steps (default: the config's num_iter)")
    p.add_argument("--fast", action="store_true", help="time the fast sampler's preset (sampling/fast.py)")
    p.add_argument("--fast-settings", help="fast sampler settings as JSON (FastSettings.as_dict()), not the preset")
    p.add_argument("--alternate", action="store_true", help="time the faithful and fast samplers alternately")
    p.add_argument("--deviation", action="store_true", help="fast vs faithful final tokens on the same key")
    p.add_argument("--flops", action="store_true", help="FLOPs per image from XLA's cost analysis; no timing")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    try:
        cpus = limit_threads(args.threads) if args.threads else sorted(os.sched_getaffinity(0))
        config, sampling, size = load_setup(args.config, args.random_weights)
        size = args.size or size
        if size % 16 or args.repeats < 1:
            raise ValueError(f"--size must be a multiple of 16 (got {size}) and --repeats >= 1")
        settings = fast_settings(args)
    except (ValueError, OSError, TypeError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2

    import jax
    import jax.numpy as jnp
    import numpy as np

    from unipic_jax.models.unipic import UniPic, UniPicConfig
    from unipic_jax.sampling import fast, t2i

    compile_events: list[tuple[str, float]] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: compile_events.append((name, secs)) if name.startswith("/jax/core/compile/") else None)

    unipic_config = UniPicConfig.from_config(config)
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    model = UniPic(unipic_config, dtype)
    grid = (size // 16, size // 16)
    num_iter = args.steps or sampling["num_iter"]
    common = {"config": args.config, "device": jax.devices()[0].device_kind, "cpus": len(cpus), "dtype": args.dtype,
              "size": size, "steps": num_iter, "batch_images": sampling["batch_images"], "cfg": sampling["cfg"]}
    if settings is not None:
        common["fast_settings"] = settings.as_dict()
        common["fast_steps"] = settings.num_iter(num_iter)
    if args.flops:
        result = {**common, **report_flops(args, model, unipic_config, sampling, grid, num_iter, settings, dtype)}
        return _report(result, args.json, None)

    start = time.perf_counter()
    params = jax.block_until_ready(random_params(unipic_config, 0, dtype))
    init_s = time.perf_counter() - start
    ids, mask = bench_prompts(sampling, unipic_config.tokens, min(unipic_config.tokens.pad, unipic_config.tokens.eos))
    key = jax.random.key(sampling["sample_seed"])

    def run(mode, sample_key=key):
        return t2i.text_to_image(model, params, ids, mask, image_shape=grid, num_iter=num_iter, cfg=sampling["cfg"],
                                 cfg_schedule=sampling["cfg_schedule"], temperature=sampling["temperature"],
                                 key=sample_key, fast=mode)

    def sample(mode):
        return jax.block_until_ready(run(mode).images)

    modes = {name: {"faithful": None, "fast": settings}[name] for name in timed_modes(args)}
    result = dict(common, init_s=round(init_s, 3))
    images = {}
    for name, mode in modes.items():  # the compiling calls
        compile_events.clear()
        traces_before = sum(t2i.TRACES.values()) + sum(fast.TRACES.values())
        start = time.perf_counter()
        images[name] = sample(mode)
        prefix = "" if len(modes) == 1 else f"{name}_"
        result.update({
            f"{prefix}first_call_s": round(time.perf_counter() - start, 3),
            f"{prefix}compile_s": round(sum(secs for _, secs in compile_events), 3),
            f"{prefix}programs_compiled": sum(1 for n, _ in compile_events if n.endswith("backend_compile_duration")),
            f"{prefix}sampler_traces": sum(t2i.TRACES.values()) + sum(fast.TRACES.values()) - traces_before})
    times = {name: [] for name in modes}
    cpu_times = {name: [] for name in modes}
    compile_events.clear()
    for _ in range(args.repeats):
        for name, mode in modes.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            sample(mode)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    result["recompiled_in_repeats"] = sum(1 for n, _ in compile_events if n.endswith("backend_compile_duration"))
    for name in modes:
        prefix = "" if len(modes) == 1 else f"{name}_"
        result.update({
            f"{prefix}repeats_s": [round(t, 3) for t in times[name]],
            f"{prefix}median_s": round(statistics.median(times[name]), 3),
            f"{prefix}min_s": round(min(times[name]), 3),
            f"{prefix}cpu_s_median": round(statistics.median(cpu_times[name]), 3)})
    if args.alternate:
        result["speedup"] = round(statistics.median(times["faithful"]) / statistics.median(times["fast"]), 3)
        result["speedup_cpu_s"] = round(statistics.median(cpu_times["faithful"]) / statistics.median(cpu_times["fast"]), 3)
    if args.deviation:
        result.update(token_deviation(run, settings, key))
    result["image_finite"] = all(bool(np.isfinite(np.asarray(x, np.float32)).all()) for x in images.values())
    result.update(load_average=os.getloadavg()[0], **peak_memory())
    timed = "fast" if "fast" in modes and not args.alternate else next(iter(modes))
    return _report(result, args.json, statistics.median(times[timed]) / sampling["batch_images"])


def token_deviation(run, settings, key) -> dict:
    """Relative RMS distance of the fast sampler's final tokens (cond rows) from the faithful ones on
    the same key, and of two faithful samples on different keys (the scale of "unrelated")."""
    import jax
    import numpy as np

    def tokens(mode, k):
        out = run(mode, k)
        return np.asarray(out.tokens[: out.images.shape[0]], np.float64)

    def rel(a, b):
        return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))

    faithful = tokens(None, key)
    return {"token_deviation_fast": round(rel(tokens(settings, key), faithful), 4),
            "token_deviation_other_key": round(rel(tokens(None, jax.random.fold_in(key, 1)), faithful), 4)}


def _report(result: dict, path, per_image) -> int:
    for k, v in result.items():
        print(f"{k}: {v}")
    if path:
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
    if per_image is not None:
        print(f"seconds_per_image={per_image:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
