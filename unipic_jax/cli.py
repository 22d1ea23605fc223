"""The `unipic-jax` command. Argument parsing only; the work lives in the library."""

from __future__ import annotations

import argparse
import os
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


MODEL_CONFIGS = ("unipic_1p5b", "tiny")


def _model_config(spec: str):
    """`--config`: "unipic_1p5b" (the released sizes), "tiny" (the smoke stage's toy sizes) or a
    fixture folder / meta.json."""
    if spec == "unipic_1p5b":
        from configs import unipic_1p5b

        return unipic_1p5b.get_config()
    if spec == "tiny":
        from configs.stages.smoke import tiny_model

        return tiny_model()
    from configs import fixture

    path = Path(spec)
    if not (path / "meta.json").is_file() and not (path.is_file() and path.suffix == ".json"):
        raise ValueError(f"--config {spec}: want {' or '.join(map(repr, MODEL_CONFIGS))} or a fixture folder "
                         f"holding meta.json")
    try:
        return fixture.get_config(path)
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"--config {spec}: malformed meta.json ({type(e).__name__}: {e})") from None


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _describe(params) -> str:
    import jax
    import numpy as np

    leaves = jax.tree.leaves(params)
    return (f"{sum(int(np.size(a)) for a in leaves):,} parameters "
            f"({_size(sum(int(np.asarray(a).nbytes) for a in leaves))})")


def _is_fixture(folder: Path) -> bool:
    return (folder / "meta.json").is_file() and (folder / "weights.safetensors").is_file()


def _stand_in_tokenizer(config, folder: Path) -> Path:
    """A byte-level tokenizer with the config's special ids (tiny random-weight models only)."""
    from unipic_jax import prompts

    tokens, vocab = config.tokens, config.qwen2.vocab_size
    if tokens.image != vocab - 1:
        raise ValueError(f"this model's <image> id {tokens.image} is not its last vocabulary id {vocab - 1}, so "
                         f"no stand-in tokenizer fits; pass --tokenizer (the Qwen2.5-1.5B-Instruct folder)")
    return prompts.write_byte_tokenizer(folder, vocab_size=vocab, eos_id=tokens.eos, pad_id=tokens.pad)


def _say_lora_merge(workdir: Path) -> None:
    """For a LoRA run (its lora.json): say which adapters were merged onto which base."""
    from unipic_jax.train import lora

    doc = lora.read_record(workdir)
    if doc is not None:
        base = doc["base"].get("init_from") or f"the random init of seed {doc['base'].get('seed')}"
        print(f"  merged its LoRA adapters (rank {doc['rank']}, alpha {doc['alpha']:g}, {doc['kernels']} kernels) "
              f"onto {base}" + (f" ({doc['quantize']})" if doc.get("quantize") else ""), flush=True)


def _convert(args) -> int:
    import tempfile

    from unipic_jax import checkpoint
    from unipic_jax.models.unipic import UniPicConfig
    from unipic_jax.train import runs

    src, dst = Path(args.src), Path(args.dst)
    sources = [src] if src.exists() else []
    checkpoint.check_destination(dst, overwrite=args.force, sources=sources)  # before any heavy work
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        if runs.is_run(src):
            if args.config:
                raise ValueError("--config: a training workdir stores its own model config; leave it out")
            config, params, tokenizer, step = runs.read_run(src, weights=args.weights)
            print(f"read the {args.weights} params of step {step} of the run in {src}", flush=True)
            _say_lora_merge(src)
        elif src.is_dir() and _is_fixture(src):
            from safetensors.numpy import load_file

            from convert.unipic import unipic_params_from_torch

            config = _model_config(os.fspath(src))
            params = unipic_params_from_torch(load_file(src / "weights.safetensors"), UniPicConfig.from_config(config),
                                              what=f"fixture {src}")
            tokenizer = _stand_in_tokenizer(config, Path(scratch) / "tokenizer")
            print(f"read the fixture model in {src} (random weights; a byte-level stand-in tokenizer)", flush=True)
        else:
            from convert.unipic import load_release_with_config

            folder = checkpoint.fetch_release(args.src)
            print(f"reading and converting the release in {folder} ...", flush=True)
            config, params = load_release_with_config(folder, _model_config(args.config or "unipic_1p5b"))
            tokenizer = checkpoint.find_tokenizer_dir(folder)
            if tokenizer is None:
                print("  note: no tokenizer folder found in the release; pass one at generation time", flush=True)
        print(f"  {_describe(params)} in {time.perf_counter() - start:.0f}s", flush=True)
        print(f"writing the checkpoint to {dst} ...", flush=True)
        checkpoint.save(dst, params, config, tokenizer_dir=tokenizer, overwrite=args.force, sources=sources)
    print(f"done in {time.perf_counter() - start:.0f}s", flush=True)
    return 0


def _init(args) -> int:
    import tempfile

    from unipic_jax import checkpoint
    from unipic_jax.api import check_seed
    from unipic_jax.models.unipic import UniPicConfig
    from unipic_jax.train.loop import init_train_params

    config = _model_config(args.config)
    seed = check_seed(args.seed)
    dst = checkpoint.check_destination(args.dst, overwrite=args.force)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = Path(args.tokenizer) if args.tokenizer else _stand_in_tokenizer(config, Path(scratch) / "tok")
        params = init_train_params(UniPicConfig.from_config(config), seed)  # what training from scratch uses
        checkpoint.save(dst, params, config, tokenizer_dir=tokenizer, overwrite=args.force)
    print(f"{dst}: a random-weight {args.config} checkpoint, {_describe(params)} (seed {seed}); its "
          f"pictures are noise, but every command runs on it", flush=True)
    return 0


def _export(args) -> int:
    from convert.export import export_release
    from unipic_jax import checkpoint
    from unipic_jax.models.unipic import UniPicConfig
    from unipic_jax.train import runs

    src, dst = Path(args.src), Path(args.dst)
    if dst.exists() and not args.force:
        raise ValueError(f"{dst}: already exists (pass --force to replace an earlier export)")
    if runs.is_run(src):
        config, params, tokenizer, step = runs.read_run(src, weights=args.weights)
        print(f"read the {args.weights} params of step {step} of the run in {src}", flush=True)
        _say_lora_merge(src)
    else:
        config, params = checkpoint.load(src)
        tokenizer = checkpoint.tokenizer_dir(src)
    out = export_release(params, UniPicConfig.from_config(config), dst, tokenizer_dir=tokenizer,
                         dtype=None if args.dtype == "float32" else args.dtype, overwrite=args.force)
    print(f"{out}: the official release layout (pytorch_model.bin, kl16.ckpt, {_describe(params)})", flush=True)
    return 0


def _plan(args) -> int:
    from unipic_jax import plan

    frozen = tuple(s for s in args.frozen.split(",") if s)
    abstract = plan.abstract_params(_model_config(args.config))
    p = plan.plan(abstract, args.mesh, train=args.train, frozen=frozen)
    print(plan.format_plan(p, top=args.top, title=args.config + (" --train" if args.train else "")))
    if args.quantize:
        print("\n" + plan.quantized_weights(abstract, args.quantize))
    if args.lora:
        if not args.train:
            raise ValueError("--lora plans training state: add --train")
        rank, _, alpha = args.lora.partition(":")
        try:
            rank, alpha = int(rank), float(alpha or 2 * int(rank))
        except ValueError:
            raise ValueError(f"--lora {args.lora!r}: expected RANK or RANK:ALPHA, e.g. 16 or 16:32") from None
        stage = None
        if args.stage:
            from unipic_jax.train.loop import load_stage_config

            stage = load_stage_config(args.stage)
        print("\n" + plan.lora_state(abstract, rank, alpha, args.lora_modules, frozen=frozen,
                                     quantize=args.quantize, stage=stage))
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
                            num_slices=args.num_slices, quantize=args.quantize)
    except aot.AotUnavailable as e:
        print(f"unipic-jax: error: {e}", file=sys.stderr)
        return 2
    except aot.CompileOOM as e:
        print(f"unipic-jax: out of device memory: {e}", file=sys.stderr)
        return 3
    return 0


def _pipeline(args):
    from unipic_jax.api import UniPicPipeline

    config = _model_config(args.config) if args.config else None
    return UniPicPipeline.from_pretrained(args.checkpoint, dtype=args.dtype, config=config, tokenizer=args.tokenizer,
                                          quantize=getattr(args, "quantize", None))


def _peek(args):
    """The model config of `--checkpoint`, read without loading weights (for checks before work)."""
    from unipic_jax.api import peek_config

    return peek_config(args.checkpoint, _model_config(args.config) if args.config else None)


def _sampling_settings(args) -> dict:
    return dict(size=args.size, steps=args.steps, cfg=args.cfg, cfg_schedule=args.cfg_schedule,
                temperature=args.temperature, progress=not args.no_progress, fast=args.fast)


def _plain_name(name, where: str) -> str:
    """A prompts-file "name": a plain file name, so that every output stays inside --out-dir."""
    if (not isinstance(name, str) or not name.strip() or name != name.strip() or name.startswith(".")
            or any(c in name for c in "/\\\0:") or len(name.encode()) > 200):
        raise ValueError(f'{where}: "name" must be a plain file name (no folders, not hidden, not empty), '
                         f"got {name!r}")
    return name


def _read_prompts(path: str, base_seed: int) -> list[dict]:
    """A .jsonl file, one {"prompt": TEXT, "seed": N (optional), "name": STEM (optional)} per line
    -> [{"prompt", "seed", "stem"}]; line i without a seed (or with null) gets `base_seed + i`."""
    from unipic_jax.api import check_seed
    from unipic_jax.eval.common import jsonl_objects

    jobs = []
    for where, job, _ in jsonl_objects(path, 'an object with a "prompt" string'):
        if not isinstance(job.get("prompt"), str):
            raise ValueError(f'{where}: want an object with a "prompt" string')
        if not job["prompt"].strip():
            raise ValueError(f"{where}: empty prompt")
        seed = job.get("seed")
        try:
            seed = check_seed(base_seed + len(jobs) if seed is None else seed)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        name = _plain_name(job["name"], where) if "name" in job else f"{len(jobs):05d}"
        jobs.append(dict(prompt=job["prompt"], seed=seed, stem=name))
    if not jobs:
        raise ValueError(f"{path}: no prompts")
    return jobs


def _numbered(path: Path, count: int) -> list[Path]:
    return [path] if count == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def _check_outputs(groups: list[list[Path]], overwrite: bool) -> None:
    """Before any work: known image types, no two outputs on one name (case-insensitively, as some
    file systems compare), and no existing file replaced unless --overwrite."""
    from unipic_jax import images

    seen: dict[str, Path] = {}
    for path in (p for group in groups for p in group):
        images.output_format(path)
        key = os.path.normcase(os.path.abspath(path)).lower()
        if key in seen:
            raise ValueError(f"{path}: two outputs would share this file name ({seen[key].name}); give each prompt "
                             f"its own name")
        seen[key] = path
        if path.is_dir():
            raise ValueError(f"{path}: is a folder, not an image file name")
        parent = path.absolute().parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise ValueError(f"{path}: {parent} is a file, not a folder")
        if path.exists() and not overwrite:
            raise ValueError(f"{path}: already exists (pass --overwrite to replace it)")


def _save(image, path: Path, overwrite: bool) -> Path:
    """Save `image` at `path`; if another process made `path` while this one sampled, keep both:
    write `STEM.N.EXT` (the first free N) and say so."""
    from unipic_jax import images

    path.parent.mkdir(parents=True, exist_ok=True)
    target = path
    for n in range(1, 10_000):
        try:
            written = images.save_image(image, target, image.info, overwrite=overwrite)
        except FileExistsError:
            target = path.with_name(f"{path.stem}.{n}{path.suffix}")
            continue
        if written != path:
            print(f"note: {path} appeared while sampling; wrote {written} instead", file=sys.stderr, flush=True)
        return written
    raise ValueError(f"{path}: no free file name left beside it")


def _generate(args) -> int:
    from unipic_jax import prompts
    from unipic_jax.api import check_sampling, check_seed, new_seed

    base = new_seed() if args.seed is None else check_seed(args.seed)
    if args.prompts:
        jobs = _read_prompts(args.prompts, base)
        out_dir = Path(args.out_dir or ".")
        targets = [_numbered(out_dir / f"{j['stem']}.{args.format}", args.batch) for j in jobs]
    else:
        if args.out_dir:
            raise ValueError("--out-dir goes with --prompts; with --prompt name the file with --out")
        if not args.prompt.strip():
            raise ValueError("empty prompt: give some text")
        jobs = [dict(prompt=args.prompt, seed=base)]
        targets = [_numbered(Path(args.out), args.batch)]
    _check_outputs(targets, args.overwrite)
    height = args.size if args.height is None else args.height
    width = args.size if args.width is None else args.width
    check_sampling(_peek(args), size=args.size, height=height, width=width, steps=args.steps, cfg=args.cfg,
                   temperature=args.temperature, batch=args.batch, negative_prompt=args.negative_prompt is not None)
    if args.negative_prompt is not None:
        prompts.require_text(args.negative_prompt, "negative prompt")  # before the model loads
    pipe = _pipeline(args)
    settings = _sampling_settings(args)
    for job in jobs:  # every prompt is tokenised and checked before the first image is made
        pipe.check_prompt(job["prompt"], size=height, width=width)
    for job, paths in zip(jobs, targets):
        out = pipe(job["prompt"], height=height, width=width, num_inference_steps=settings["steps"],
                   guidance_scale=settings["cfg"], guidance_schedule=settings["cfg_schedule"],
                   temperature=settings["temperature"], seed=job["seed"], num_images_per_prompt=args.batch,
                   negative_prompt=args.negative_prompt, progress=settings["progress"], fast=settings["fast"])
        for image, path in zip(out.images, paths):
            print(f"{_save(image, path, args.overwrite)}  (seed {job['seed']})", flush=True)
    return 0


def _edit(args) -> int:
    from unipic_jax import images, prompts
    from unipic_jax.api import check_sampling, check_seed

    seed = None if args.seed is None else check_seed(args.seed)
    if not args.prompt.strip():
        raise ValueError("empty prompt: give some text")
    out = Path(args.out)
    _check_outputs([[out]], args.overwrite)
    config = _peek(args)
    check_sampling(config, size=args.size, steps=args.steps, cfg=args.cfg, temperature=args.temperature,
                   negative_prompt=args.negative_prompt is not None)
    if args.negative_prompt is not None:
        prompts.require_text(args.negative_prompt, "negative prompt")
    source = images.load_image(args.image)
    if args.keep_aspect:  # the shape the edit will have, checked before the model loads
        height, width = images.fit_to_budget(*source.size, args.size * args.size)
        check_sampling(config, height=height, width=width, steps=args.steps, cfg=args.cfg,
                       temperature=args.temperature)
    pipe = _pipeline(args)
    edited = pipe.edit(source, args.prompt, seed=seed, keep_aspect=args.keep_aspect,
                       negative_prompt=args.negative_prompt, **_sampling_settings(args))
    print(f"{_save(edited, out, args.overwrite)}  (seed {edited.info['seed']})", flush=True)
    return 0


def _caption(args) -> int:
    from unipic_jax import images
    from unipic_jax.api import check_caption, check_seed

    seed = None if args.seed is None else check_seed(args.seed)
    if not args.prompt.strip():
        raise ValueError("empty prompt: give some text")
    check_caption(_peek(args), size=args.size, path=args.path, max_new_tokens=args.max_new_tokens,
                  sample=args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    source = images.load_image(args.image)
    pipe = _pipeline(args)
    print(pipe.caption(source, args.prompt, size=args.size, max_new_tokens=args.max_new_tokens, path=args.path,
                       sample=args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       seed=seed), flush=True)
    return 0


def _eval_gen(args) -> int:
    """Images for a benchmark in its official layout: checked before loading, resumable, shardable."""
    from unipic_jax import eval as benchmarks
    from unipic_jax.api import check_sampling, check_seed
    from unipic_jax.eval import common

    shard = common.parse_shard(args.shard)
    settings = _sampling_settings(args)
    progress = settings.pop("progress")
    module, plan, record = benchmarks.prepare(
        args.benchmark, args.input, args.out_dir, settings=settings, dtype=args.dtype, samples=args.samples,
        seed=check_seed(args.seed), shard=shard, images=args.images, model_name=args.model_name, redo=args.overwrite)
    check_sampling(_peek(args), size=args.size, steps=args.steps, cfg=args.cfg, temperature=args.temperature)
    where = f"{args.benchmark} shard {shard[0]}/{shard[1]}"
    print(f"{where}: {len(plan.items)} items, {len(plan.items) - len(plan.pending)} finished already", flush=True)
    if plan.pending:
        pipe = _pipeline(args)
        if module.TASK == "t2i":  # every prompt is tokenised and checked before the first image is made
            for item in plan.pending:
                pipe.check_prompt(item.prompt, size=args.size)
        written = benchmarks.run(pipe, module, plan, record, settings, progress=progress, desc=where)
        print(f"{where}: wrote {written} items under {args.out_dir}", flush=True)
    return 0


def _demo(args) -> int:
    """The web demo (Gradio): a chat that generates, edits and answers questions about pictures."""
    try:
        from unipic_jax.demo.app import serve
    except ImportError as e:
        print(f"unipic-jax: error: the demo needs Gradio ({e}); install it with: pip install -e \".[demo]\"",
              file=sys.stderr)
        return 2
    serve(args.checkpoint, host=args.host, port=args.port, size=args.size, steps=args.steps, dtype=args.dtype)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unipic-jax", description="Skywork UniPic-1 in JAX/Flax.")
    sub = p.add_subparsers(dest="command", required=True)

    par = sub.add_parser("parity", help="replay the official PyTorch fixtures and compare outputs")
    par.add_argument("fixture_root", help="folder laid out like tests/fixtures (vae/, mar/, ...)")
    par.add_argument("--only", help="comma-separated components: vae,mar,qwen2,siglip,unipic")
    par.set_defaults(func=_parity)

    conv = sub.add_parser("convert", help="make a checkpoint from the official release, a training workdir or a "
                                          "fixture folder")
    conv.add_argument("src", help="release folder (pytorch_model.bin, kl16.ckpt, Qwen2.5-1.5B-Instruct/), a "
                                  "Hugging Face Hub id (downloads; online only), a `unipic-jax train` workdir or a "
                                  "fixture folder (meta.json, weights.safetensors)")
    conv.add_argument("dst", help="checkpoint directory to create")
    conv.add_argument("--config", help="model sizes of a release: 'unipic_1p5b' (default), 'tiny' or a fixture "
                                       "folder holding meta.json (the LLM's sizes come from the release's own "
                                       "config.json)")
    conv.add_argument("--weights", default="ema", choices=("ema", "params"),
                      help="from a training workdir: the EMA (default) or the raw params")
    conv.add_argument("--force", action="store_true",
                      help="replace an existing checkpoint at DST (never any other folder)")
    conv.set_defaults(func=_convert)

    ini = sub.add_parser("init", help="a random-weight checkpoint (tiny: a try-out model that runs every command)")
    ini.add_argument("dst", help="checkpoint directory to create")
    ini.add_argument("--config", default="tiny", help="model sizes: 'tiny' (default), 'unipic_1p5b' or a fixture "
                                                      "folder holding meta.json")
    ini.add_argument("--seed", type=int, default=0, help="init seed (default 0)")
    ini.add_argument("--tokenizer", help="tokenizer folder (default: a byte-level stand-in, tiny models only)")
    ini.add_argument("--force", action="store_true", help="replace an existing checkpoint at DST")
    ini.set_defaults(func=_init)

    exp = sub.add_parser("export", help="write a checkpoint or training workdir in the official release layout "
                                        "(pytorch_model.bin, kl16.ckpt, Qwen2.5-1.5B-Instruct/) for PyTorch")
    exp.add_argument("src", help="a checkpoint directory or a `unipic-jax train` workdir")
    exp.add_argument("dst", help="release folder to create")
    exp.add_argument("--weights", default="ema", choices=("ema", "params"),
                     help="from a training workdir: the EMA (default) or the raw params")
    exp.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="tensor dtype written")
    exp.add_argument("--force", action="store_true", help="replace an earlier export at DST (never any other folder)")
    exp.set_defaults(func=_export)

    pl = sub.add_parser("plan", help="per-device bytes of params (and training state) on a mesh, from shapes only")
    pl.add_argument("--mesh", required=True, help="mesh sizes, e.g. data=1,fsdp=4,tensor=2 (their product is "
                                                  "the device count planned for)")
    pl.add_argument("--config", default="unipic_1p5b",
                    help="model sizes: 'unipic_1p5b' (default) or a fixture folder holding meta.json")
    pl.add_argument("--train", action="store_true", help="add float32 AdamW m, v and EMA of the trainable params")
    pl.add_argument("--frozen", default="vae,siglip2",
                    help="components without optimizer state or EMA under --train (default: vae,siglip2)")
    pl.add_argument("--top", type=int, default=10, help="replicated / unsplit params to list (default 10)")
    pl.add_argument("--quantize", choices=("int8", "int4"),
                    help="also the inference weights' bytes in bfloat16 against this weight-only quantization")
    pl.add_argument("--lora", metavar="RANK[:ALPHA]",
                    help="with --train: the training state of LoRA adapters (alpha default 2 x rank) against "
                         "full fine-tuning; with --quantize the frozen base is quantized (QLoRA)")
    pl.add_argument("--lora-modules", metavar="REGEX",
                    help="module paths that get adapters (default: the LLM's attention and MLP, MAR's blocks)")
    pl.add_argument("--stage", metavar="NAME",
                    help="with --lora: the stage (pt, align, ct, sft) whose trainable params full fine-tuning "
                         "and the adapters cover, as `train` does (default: every component outside --frozen)")
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

    cp = sub.add_parser("compile", help="compile for a TPU slice (needs libtpu, not a TPU) or GPUs (needs the "
                                        "CUDA plugin, not a GPU) on this host: per-chip memory, FLOPs, overflow")
    cp.add_argument("--topology", required=True,
                    help="v5e:16x16, v5:4x4x4 (v5p), v6e:16x16, v4:2x2x1 ... or a slice name: v5e-256, v5p-128; "
                         "or a GPU preset: h100, a100, a6000, gpu24 (24 GiB), xN for N GPUs of one host (h100x8)")
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
    cp.add_argument("--quantize", choices=("int8", "int4"),
                    help="the sampler with weight-only quantized weights (not with --train)")
    cp.set_defaults(func=_compile)

    def model_args(sp, *, sizes: bool, seed_help: str = "random seed (default: a fresh one, printed and stored in "
                                                           "the PNG)",
                   overwrite_help: str = "replace existing output files"):
        sp.add_argument("--checkpoint", required=True,
                        help="checkpoint made by `unipic-jax convert`, an official release folder (converted on "
                             "every run) or a Hugging Face Hub id (online only)")
        sp.add_argument("--config", help="model sizes of a release folder: 'unipic_1p5b' (default), 'tiny' or a "
                                         "fixture folder")
        sp.add_argument("--tokenizer", help="tokenizer folder (default: the one in the checkpoint)")
        sp.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
        sp.add_argument("--quantize", choices=("int8", "int4"),
                        help="weight-only quantization of the LLM's, MAR's and SigLIP2's blocks and the token "
                             "table at load (less memory, other numbers; default: none, the faithful model)")
        sp.add_argument("--seed", type=int, help=seed_help)
        if sizes:
            sp.add_argument("--size", type=int, default=1024, help="image side in pixels, a multiple of 16 "
                                                                  "(default 1024)")
            sp.add_argument("--steps", type=int, default=32, help="MAR steps (default 32 as the released scripts; "
                                                                 "the paper's evaluation used 64)")
            sp.add_argument("--cfg", type=float, default=3.0, help="guidance scale (default 3.0; 1 = no guidance)")
            sp.add_argument("--cfg-schedule", default="constant", choices=("constant", "linear"))
            sp.add_argument("--temperature", type=float, default=1.0, help="diffusion sampling temperature")
            sp.add_argument("--fast", action="store_true",
                            help="the fast sampler's preset (a quarter of --steps, annealed diffusion steps "
                                 "(DiSA), cached guidance (LazyMAR)): other images than the default faithful "
                                 "sampler; its settings are stored in the metadata")
            sp.add_argument("--no-progress", action="store_true", help="no progress bar")
            sp.add_argument("--overwrite", action="store_true", help=overwrite_help)

    gen = sub.add_parser("generate", help="text to image: PNGs with the prompt, seed and settings in their metadata")
    model_args(gen, sizes=True)
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the text to draw")
    what.add_argument("--prompts", metavar="FILE.jsonl",
                      help='one {"prompt": ..., "seed": N, "name": STEM} per line (seed and name optional)')
    gen.add_argument("--batch", type=int, default=1, help="images per prompt (files OUT-0.png, OUT-1.png, ...)")
    gen.add_argument("--height", type=int, help="image height in pixels, a multiple of 16 (default --size)")
    gen.add_argument("--width", type=int, help="image width in pixels, a multiple of 16 (default --size)")
    gen.add_argument("--negative-prompt", help='replaces the guidance prompt "Generate an image." by "Generate an '
                                               'image: TEXT" (default: the released guidance prompt)')
    gen.add_argument("--out", default="out.png", help="output image for --prompt: .png (default out.png), .jpg, "
                                                      ".jpeg or .webp, settings in its metadata")
    gen.add_argument("--out-dir", help="output folder for --prompts (default: the current folder)")
    gen.add_argument("--format", default="png", choices=("png", "jpg", "webp"), help="file type for --prompts")
    gen.set_defaults(func=_generate)

    ed = sub.add_parser("edit", help="edit an image as a prompt says")
    model_args(ed, sizes=True)
    ed.add_argument("--image", required=True, help="source image (centre-cropped to a square)")
    ed.add_argument("--prompt", required=True, help="the edit instruction")
    ed.add_argument("--out", default="edited.png", help="output image: .png (default edited.png), .jpg, .jpeg "
                                                       "or .webp")
    ed.add_argument("--keep-aspect", action="store_true",
                    help="keep the source's aspect ratio (resized to multiples of 16 within --size squared pixels) "
                         "instead of the released script's centre crop")
    ed.add_argument("--negative-prompt", help='replaces the guidance text "Repeat this image." (default: it)')
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

    demo = sub.add_parser("demo", help="a web demo in the browser: chat to generate, edit and ask about pictures")
    demo.add_argument("--checkpoint", required=True, help="checkpoint made by `unipic-jax convert` or `init`")
    demo.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine "
                                                          "only)")
    demo.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    demo.add_argument("--size", type=int, default=1024, help="the size control's first value (default 1024)")
    demo.add_argument("--steps", type=int, default=32, help="the MAR steps control's first value (default 32)")
    demo.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="the dtype loaded at start (the page can switch; the other loads on first use)")
    demo.set_defaults(func=_demo)

    ev = sub.add_parser("eval-gen", help="images for GenEval, DPG-Bench, GEdit-Bench or ImgEdit-Bench in the layout "
                                         "their official scorers read (resumable, shardable)")
    ev.add_argument("benchmark", choices=("geneval", "dpg", "gedit", "imgedit"))
    model_args(ev, sizes=True, seed_help="base seed (default 0): image j of item i has seed SEED + i*samples + j",
               overwrite_help="remake finished items too (default: skip them)")
    ev.set_defaults(seed=0)  # benchmarks are reproducible
    ev.add_argument("--input", "--metadata", "--prompts", "--data", "--edits", dest="input", required=True,
                    help="geneval: --metadata evaluation_metadata.jsonl; dpg: --prompts, the folder of .txt "
                         "prompts; gedit: --data, a JSONL export of the dataset (see the README); imgedit: "
                         "--edits basic_edit.json (with --images)")
    ev.add_argument("--out-dir", required=True, help="where the layout is written (finished items are kept)")
    ev.add_argument("--samples", type=int, help="images per item (default 4 for geneval and dpg, 1 for the edits)")
    ev.add_argument("--shard", default="0/1", help="I/N: this process makes the items whose index %% N == I")
    ev.add_argument("--images", help="imgedit: the folder of the benchmark's original images")
    ev.add_argument("--model-name", help="gedit: the folder under --out-dir (the scorer's --model_name; "
                                         "default unipic)")
    ev.set_defaults(func=_eval_gen)
    return p


def quiet_libtpu(command: str) -> bool:
    """With libtpu installed (the `tpu` extra, for `compile`) on a host without TPU chips, JAX
    tries the TPU backend on every start and prints libtpu's initialisation errors. For every
    command but `compile` on such a host (and no CUDA plugin, no JAX_PLATFORMS set, JAX not yet
    imported), run on the CPU backend alone. Returns whether it did."""
    import glob
    import importlib.util

    if (command == "compile" or "jax" in sys.modules or os.environ.get("JAX_PLATFORMS")
            or importlib.util.find_spec("libtpu") is None or glob.glob("/dev/accel*")
            or glob.glob("/dev/vfio/[0-9]*") or any(importlib.util.find_spec(f"jax_cuda{v}_plugin")
                                                    for v in (12, 13))):
        return False
    os.environ["JAX_PLATFORMS"] = "cpu"
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libtpu(args.command)
    try:
        if args.command != "compile":  # TPU AOT compiles for other machines: nothing to reuse here
            from unipic_jax import compile_cache

            compile_cache.enable()
        return args.func(args)
    except (ValueError, OSError) as e:
        text = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message held
        print(f"unipic-jax: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unipic-jax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
