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
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    try:
        cpus = limit_threads(args.threads) if args.threads else sorted(os.sched_getaffinity(0))
        config, sampling, size = load_setup(args.config, args.random_weights)
        size = args.size or size
        if size % 16 or args.repeats < 1:
            raise ValueError(f"--size must be a multiple of 16 (got {size}) and --repeats >= 1")
    except (ValueError, OSError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2

    import jax
    import jax.numpy as jnp
    import numpy as np

    from unipic_jax.models.unipic import UniPic, UniPicConfig
    from unipic_jax.sampling import t2i

    compile_events: list[tuple[str, float]] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: compile_events.append((name, secs)) if name.startswith("/jax/core/compile/") else None)

    unipic_config = UniPicConfig.from_config(config)
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    start = time.perf_counter()
    params = jax.block_until_ready(random_params(unipic_config, 0, dtype))
    init_s = time.perf_counter() - start
    model = UniPic(unipic_config, dtype)
    grid = (size // 16, size // 16)
    num_iter = args.steps or sampling["num_iter"]
    ids, mask = bench_prompts(sampling, unipic_config.tokens, min(unipic_config.tokens.pad, unipic_config.tokens.eos))
    key = jax.random.key(sampling["sample_seed"])

    def sample():
        out = t2i.text_to_image(model, params, ids, mask, image_shape=grid, num_iter=num_iter, cfg=sampling["cfg"],
                                cfg_schedule=sampling["cfg_schedule"], temperature=sampling["temperature"], key=key)
        return jax.block_until_ready(out.images)

    compile_events.clear()
    traces_before = sum(t2i.TRACES.values())
    start = time.perf_counter()
    images = sample()
    first_s = time.perf_counter() - start
    programs = sum(1 for name, _ in compile_events if name.endswith("backend_compile_duration"))
    compile_s = sum(secs for _, secs in compile_events)
    traces = sum(t2i.TRACES.values()) - traces_before
    times, cpu_times = [], []
    compile_events.clear()
    for _ in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        sample()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    recompiled = sum(1 for name, _ in compile_events if name.endswith("backend_compile_duration"))
    per_image = statistics.median(times) / sampling["batch_images"]
    result = {
        "config": args.config, "device": jax.devices()[0].device_kind, "cpus": len(cpus), "dtype": args.dtype,
        "size": size, "steps": num_iter, "batch_images": sampling["batch_images"], "cfg": sampling["cfg"],
        "init_s": round(init_s, 3), "first_call_s": round(first_s, 3), "compile_s": round(compile_s, 3),
        "programs_compiled": programs, "sampler_traces": traces, "recompiled_in_repeats": recompiled,
        "repeats_s": [round(t, 3) for t in times], "median_s": round(statistics.median(times), 3),
        "min_s": round(min(times), 3), "cpu_s_median": round(statistics.median(cpu_times), 3),
        "image_finite": bool(np.isfinite(np.asarray(images, np.float32)).all()),
        "load_average": os.getloadavg()[0], **peak_memory(),
    }
    for k, v in result.items():
        print(f"{k}: {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"seconds_per_image={per_image:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
