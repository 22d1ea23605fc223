"""The `unipic-jax` command. Argument parsing only; the work lives in the library."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _parity(args) -> int:
    from unipic_jax import parity

    only = [s for s in args.only.split(",") if s] if args.only else None
    print(parity.HEADER, flush=True)
    results = parity.run(args.fixture_root, only, on_row=lambda r: print(parity.format_row(r), flush=True))
    failed = [r for r in parity.iter_rows(results) if not r.ok]
    ok = parity.rows_ok(results, only)
    n = sum(1 for _ in parity.iter_rows(results))
    print(f"{n - len(failed)} passed, {len(failed)} failed")
    if failed:
        print("failing rows:")
        for r in failed:
            print("  " + parity.format_row(r))
    elif not ok:
        print("a component asked for with --only was skipped (or nothing was compared)")
    return 0 if ok else 1


def _model_config(spec: str):
    """`--config`: "unipic_1p5b" (the released sizes) or a fixture folder / meta.json."""
    if spec == "unipic_1p5b":
        from configs import unipic_1p5b

        return unipic_1p5b.get_config()
    from configs import fixture

    path = Path(spec)
    if not (path / "meta.json").is_file() and not (path.is_file() and path.suffix == ".json"):
        raise ValueError(f"--config {spec}: want 'unipic_1p5b' or a fixture folder holding meta.json")
    return fixture.get_config(path)


def _convert(args) -> int:
    import jax
    import numpy as np

    from convert.unipic import load_release
    from unipic_jax import checkpoint
    from unipic_jax.models.unipic import UniPicConfig

    config = _model_config(args.config)
    dst = Path(args.dst)
    if dst.exists() and not args.force:
        raise ValueError(f"{dst}: already exists (pass --force to replace it)")
    start = time.perf_counter()
    folder = checkpoint.fetch_release(args.src)
    print(f"reading and converting the release in {folder} ...", flush=True)
    params = load_release(folder, UniPicConfig.from_config(config))
    leaves = jax.tree.leaves(params)
    size = sum(int(np.asarray(a).nbytes) for a in leaves)
    shown = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
    print(f"  {sum(int(np.size(a)) for a in leaves):,} parameters ({shown}) "
          f"in {time.perf_counter() - start:.0f}s", flush=True)
    tokenizer = checkpoint.find_tokenizer_dir(folder)
    if tokenizer is None:
        print("  note: no tokenizer folder found in the release; pass one at generation time", flush=True)
    print(f"writing the checkpoint to {dst} ...", flush=True)
    checkpoint.save(dst, params, config, tokenizer_dir=tokenizer, overwrite=args.force)
    print(f"done in {time.perf_counter() - start:.0f}s", flush=True)
    return 0


def _plan(args) -> int:
    from unipic_jax import plan

    frozen = tuple(s for s in args.frozen.split(",") if s)
    abstract = plan.abstract_params(_model_config(args.config))
    p = plan.plan(abstract, args.mesh, train=args.train, frozen=frozen)
    print(plan.format_plan(p, top=args.top, title=args.config + (" --train" if args.train else "")))
    return 0


def _train(args) -> int:
    from unipic_jax import distributed
    from unipic_jax.train import loop

    cluster = distributed.initialize(args.coordinator, args.process_id, args.num_processes)
    if cluster is None and args.mesh is None:
        result = loop.train_main(args.config, args.data, args.workdir, args.set, progress=not args.no_progress)
    else:
        distributed.setup_logging()
        result = distributed.train_main(args.config, args.data, args.workdir, args.set, mesh=args.mesh or "fsdp=-1",
                                        progress=not args.no_progress)
        if not distributed.is_main_process():
            return 0
    print(f"trained steps {result.start_step}..{int(result.state.step)}; metrics in "
          f"{Path(args.workdir) / 'metrics.jsonl'}", flush=True)
    return 0


def _compile(args) -> int:
    from unipic_jax import aot

    try:
        aot.compile_command(args.topology, model_config=_model_config(args.config), mesh=args.mesh, train=args.train,
                            stage=args.stage, batch=args.batch, resolution=args.resolution,
                            und_resolution=args.und_resolution, num_iter=args.num_iter, dtype=args.dtype,
                            num_slices=args.num_slices)
    except aot.AotUnavailable as e:
        print(f"unipic-jax: error: {e}", file=sys.stderr)
        return 2
    except aot.CompileOOM as e:
        print(f"unipic-jax: HBM overflow: {e}", file=sys.stderr)
        return 3
    return 0


def _pipeline(args):
    from unipic_jax.api import UniPicPipeline

    config = _model_config(args.config) if args.config else None
    return UniPicPipeline.from_pretrained(args.checkpoint, dtype=args.dtype, config=config, tokenizer=args.tokenizer)


def _sampling_settings(args) -> dict:
    return dict(size=args.size, steps=args.steps, cfg=args.cfg, cfg_schedule=args.cfg_schedule,
                temperature=args.temperature, progress=not args.no_progress)


def _read_prompts(path: str) -> list[dict]:
    """A .jsonl file, one {"prompt": TEXT, "seed": N (optional), "name": STEM (optional)} per line."""
    jobs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                job = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e})") from None
            if not isinstance(job, dict) or not isinstance(job.get("prompt"), str):
                raise ValueError(f"{path}:{number}: want an object with a \"prompt\" string")
            if not job["prompt"].strip():
                raise ValueError(f"{path}:{number}: empty prompt")
            jobs.append(job)
    if not jobs:
        raise ValueError(f"{path}: no prompts")
    return jobs


def _numbered(path: Path, count: int) -> list[Path]:
    return [path] if count == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def _generate(args) -> int:
    from unipic_jax import images
    from unipic_jax.api import new_seed, save_images

    images.check_size(args.size)
    if args.prompts:
        jobs = _read_prompts(args.prompts)
        out_dir = Path(args.out_dir or ".")
        base = new_seed() if args.seed is None else args.seed
        jobs = [dict(prompt=j["prompt"], seed=int(j.get("seed", base + i)), stem=str(j.get("name", f"{i:05d}")))
                for i, j in enumerate(jobs)]
        targets = [_numbered(out_dir / f"{j['stem']}.png", args.batch) for j in jobs]
    else:
        if not args.prompt.strip():
            raise ValueError("empty prompt: give some text")
        jobs = [dict(prompt=args.prompt, seed=new_seed() if args.seed is None else args.seed)]
        targets = [_numbered(Path(args.out), args.batch)]
    pipe = _pipeline(args)
    settings = _sampling_settings(args)
    for job in jobs:  # every prompt is tokenised and checked before the first image is made
        pipe.check_prompt(job["prompt"], size=args.size)
    for job, paths in zip(jobs, targets):
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        for path in save_images(pipe.generate(job["prompt"], seed=job["seed"], batch=args.batch, **settings), paths):
            print(f"{path}  (seed {job['seed']})", flush=True)
    return 0


def _edit(args) -> int:
    from unipic_jax import images
    from unipic_jax.api import save_images

    images.check_size(args.size)
    if not args.prompt.strip():
        raise ValueError("empty prompt: give some text")
    source = images.load_image(args.image)
    pipe = _pipeline(args)
    edited = pipe.edit(source, args.prompt, seed=args.seed, **_sampling_settings(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    path, = save_images([edited], [args.out])
    print(f"{path}  (seed {edited.info['seed']})", flush=True)
    return 0


def _caption(args) -> int:
    from unipic_jax import images

    if args.size is not None:
        images.check_size(args.size)
    if not args.prompt.strip():
        raise ValueError("empty prompt: give some text")
    source = images.load_image(args.image)
    pipe = _pipeline(args)
    print(pipe.caption(source, args.prompt, size=args.size, max_new_tokens=args.max_new_tokens, path=args.path,
                       sample=args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       seed=args.seed), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unipic-jax", description="Skywork UniPic-1 in JAX/Flax.")
    sub = p.add_subparsers(dest="command", required=True)

    par = sub.add_parser("parity", help="replay the official PyTorch fixtures and compare outputs")
    par.add_argument("fixture_root", help="folder laid out like shared/fixtures (vae/, mar/, ...)")
    par.add_argument("--only", help="comma-separated components: vae,mar,qwen2,siglip,unipic")
    par.set_defaults(func=_parity)

    conv = sub.add_parser("convert", help="convert the official release into an orbax checkpoint")
    conv.add_argument("src", help="release folder (pytorch_model.bin, kl16.ckpt, Qwen2.5-1.5B-Instruct/) "
                                  "or a Hugging Face Hub id (downloads; online only)")
    conv.add_argument("dst", help="checkpoint directory to create")
    conv.add_argument("--config", default="unipic_1p5b",
                      help="model sizes: 'unipic_1p5b' (default) or a fixture folder holding meta.json")
    conv.add_argument("--force", action="store_true", help="replace an existing checkpoint at DST")
    conv.set_defaults(func=_convert)

    pl = sub.add_parser("plan", help="per-device bytes of params (and training state) on a mesh, from shapes only")
    pl.add_argument("--mesh", required=True, help="mesh sizes, e.g. data=1,fsdp=4,tensor=2 (their product is "
                                                  "the device count planned for)")
    pl.add_argument("--config", default="unipic_1p5b",
                    help="model sizes: 'unipic_1p5b' (default) or a fixture folder holding meta.json")
    pl.add_argument("--train", action="store_true", help="add float32 AdamW m, v and EMA of the trainable params")
    pl.add_argument("--frozen", default="vae,siglip2",
                    help="components without optimizer state or EMA under --train (default: vae,siglip2)")
    pl.add_argument("--top", type=int, default=10, help="replicated / unsplit params to list (default 10)")
    pl.set_defaults(func=_plan)

    tr = sub.add_parser("train", help="train a stage (pt, align, ct, sft, smoke) with resumable checkpoints")
    tr.add_argument("--config", required=True,
                    help="stage NAME[:ARG] from configs/stages (e.g. 'smoke', 'ct:batch=512') or FILE.py[:ARG]")
    tr.add_argument("--data", required=True,
                    help="folder with t2i.jsonl/edit.jsonl/und.jsonl, or task=source,... "
                         "(source: FILE.jsonl, an image folder with .txt captions, tfds:NAME[:SPLIT])")
    tr.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and TensorBoard logs; "
                                                     "an existing run resumes from its latest checkpoint")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set total_steps=100 --set optim.lr=1e-4")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.add_argument("--mesh", help="train on a device mesh, e.g. data=2,fsdp=-1,tensor=2 (default: one device; "
                                   "fsdp=-1 over every device when several processes run)")
    tr.add_argument("--coordinator", help="multi-host: HOST:PORT of process 0, or 'auto' (JAX detects Cloud TPU, "
                                          "SLURM, ...); default $UNIPIC_COORDINATOR")
    tr.add_argument("--process-id", type=int, help="multi-host: this process's index (default $UNIPIC_PROCESS_ID)")
    tr.add_argument("--num-processes", type=int,
                    help="multi-host: the number of processes (default $UNIPIC_NUM_PROCESSES)")
    tr.set_defaults(func=_train)

    cp = sub.add_parser("compile", help="compile for a TPU slice on this host (needs libtpu, not a TPU): "
                                        "per-chip memory, FLOPs, HBM overflow")
    cp.add_argument("--topology", required=True,
                    help="v5e:16x16, v5:4x4x4 (v5p), v6e:16x16, v4:2x2x1 ... or a slice name: v5e-256, v5p-128")
    cp.add_argument("--config", default="unipic_1p5b",
                    help="model sizes: 'unipic_1p5b' (default) or a fixture folder holding meta.json")
    cp.add_argument("--mesh", default="fsdp=-1", help="mesh sizes over the topology's chips (default fsdp=-1)")
    cp.add_argument("--num-slices", type=int, default=1, help="slices joined over DCN; the data axis spans them")
    cp.add_argument("--train", action="store_true", help="compile the train step (default: the sampler's "
                                                         "heaviest step programs)")
    cp.add_argument("--stage", default="sft", help="with --train: stage NAME[:ARG] from configs/stages (default sft)")
    cp.add_argument("--batch", type=int, help="global batch (--train: split over the stage's tasks; default the "
                                              "stage's) or images to sample (default 1)")
    cp.add_argument("--resolution", type=int, help="generation image side in px (default: the stage's; 1024 "
                                                   "for the sampler)")
    cp.add_argument("--und-resolution", type=int, help="with --train: understanding image side (default the stage's)")
    cp.add_argument("--num-iter", type=int, default=32, help="sampler MAR steps (default 32)")
    cp.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"), help="compute dtype")
    cp.set_defaults(func=_compile)

    def model_args(sp, *, sizes: bool):
        sp.add_argument("--checkpoint", required=True,
                        help="checkpoint made by `unipic-jax convert`, an official release folder (converted on "
                             "every run) or a Hugging Face Hub id (online only)")
        sp.add_argument("--config", help="model sizes of a release folder: 'unipic_1p5b' (default) or a fixture folder")
        sp.add_argument("--tokenizer", help="tokenizer folder (default: the one in the checkpoint)")
        sp.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
        sp.add_argument("--seed", type=int, help="random seed (default: a fresh one, printed and stored in the PNG)")
        if sizes:
            sp.add_argument("--size", type=int, default=1024, help="image side in pixels, a multiple of 16 "
                                                                  "(default 1024)")
            sp.add_argument("--steps", type=int, default=32, help="MAR steps (default 32 as the released scripts; "
                                                                 "the paper's evaluation used 64)")
            sp.add_argument("--cfg", type=float, default=3.0, help="guidance scale (default 3.0; 1 = no guidance)")
            sp.add_argument("--cfg-schedule", default="constant", choices=("constant", "linear"))
            sp.add_argument("--temperature", type=float, default=1.0, help="diffusion sampling temperature")
            sp.add_argument("--no-progress", action="store_true", help="no progress bar")

    gen = sub.add_parser("generate", help="text to image: PNGs with the prompt, seed and settings in their metadata")
    model_args(gen, sizes=True)
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the text to draw")
    what.add_argument("--prompts", metavar="FILE.jsonl",
                      help='one {"prompt": ..., "seed": N, "name": STEM} per line (seed and name optional)')
    gen.add_argument("--batch", type=int, default=1, help="images per prompt (files OUT-0.png, OUT-1.png, ...)")
    gen.add_argument("--out", default="out.png", help="output PNG for --prompt (default out.png)")
    gen.add_argument("--out-dir", help="output folder for --prompts (default: the current folder)")
    gen.set_defaults(func=_generate)

    ed = sub.add_parser("edit", help="edit an image as a prompt says")
    model_args(ed, sizes=True)
    ed.add_argument("--image", required=True, help="source image (centre-cropped to a square)")
    ed.add_argument("--prompt", required=True, help="the edit instruction")
    ed.add_argument("--out", default="edited.png", help="output PNG (default edited.png)")
    ed.set_defaults(func=_edit)

    cap = sub.add_parser("caption", help="describe an image, or answer a question about it")
    model_args(cap, sizes=False)
    cap.add_argument("--image", required=True, help="image (padded to a square with grey)")
    cap.add_argument("--prompt", default="Describe the image in detail.", help="the question")
    cap.add_argument("--size", type=int, help="image side the model sees (default 1024; the siglip path uses "
                                              "the tower's size)")
    cap.add_argument("--max-new-tokens", type=int, default=1024)
    cap.add_argument("--path", default="mar", choices=("mar", "siglip"),
                     help="image features: 'mar' (the released path) or 'siglip' (the paper's SigLIP2 path)")
    cap.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    cap.add_argument("--temperature", type=float, default=1.0)
    cap.add_argument("--top-k", type=int, default=0)
    cap.add_argument("--top-p", type=float, default=1.0)
    cap.set_defaults(func=_caption)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:
        print(f"unipic-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
