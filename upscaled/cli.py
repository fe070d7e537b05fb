"""The `upscaled` command line.

Parsers are declared here; each command imports its implementation only when it runs, so that
`upscaled serve` never loads trainer code and `--help` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from loguru import logger

from core import __version__

EXIT_USAGE = 2


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="PATH", help="config file (default: $UPSCALED_CONFIG, else ./config.yaml, else built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key, validated like the file (repeatable), e.g. --set trainer.batch=8")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")


def _self_ensemble(p: argparse.ArgumentParser) -> None:
    p.add_argument("--self-ensemble", type=int, choices=[1, 2, 4, 8], metavar="N",
                   help="average the model over N flipped/transposed views (1, 2, 4, 8): closer to the original "
                   "(higher PSNR), slightly smoother, N times slower (default: inference.self_ensemble)")


def _outscale(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        x = 0.0
    if not 0 < x <= 16:  # core.config.MAX_OUTPUT_SCALE, without importing the config here
        raise argparse.ArgumentTypeError(f"expected a number > 0 and <= 16, got {text!r}")
    return x


def _long_side(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a number of pixels >= 1, got {text!r}")
    return int(text)


def _size_overrides(args: argparse.Namespace) -> list[str]:
    """`upscale --outscale X` / `--long-side N` as --set overrides: the one given replaces both keys."""
    if getattr(args, "outscale", None) is not None:
        return [f"output.scale={args.outscale!r}", "output.long_side=null"]
    if getattr(args, "long_side", None) is not None:
        return [f"output.long_side={args.long_side}", "output.scale=null"]
    return []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upscaled",
        description="4x neural super-resolution: one-shot on files, or as a hot-folder service.",
    )
    parser.add_argument("--version", action="version", version=f"upscaled {__version__}")
    # --config is accepted before the command too (`upscaled --config X status`); after it wins.
    parser.add_argument("--config", dest="config_before", metavar="PATH", help="config file (also accepted after the command)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "upscale", help="upscale image files or folders once",
        description="Upscale images (files, or folders recursively) into OUTDIR, keeping each input's "
        "relative path and name. Existing outputs are never overwritten without --overwrite. "
        "Exits 1 if any file failed.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for the upscaled images")
    p.add_argument("--model", metavar="PATH", help="checkpoint file, a bundled model (fidelity, gan, real), or a version from "
                   "`upscaled models list` (imported ones too) (default: the configured, published or bundled fidelity one)")
    p.add_argument("--format", choices=["png", "jpg", "webp"], help="output format (default: the input's own)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--outscale", type=_outscale, metavar="X", help="the output's size as a factor of the input's "
                      "(> 0, <= 16; e.g. 2 or 2.5): the model runs at its own scale, then its output is resized "
                      "with Lanczos (default: output.scale, else the model's scale)")
    size.add_argument("--long-side", type=_long_side, metavar="N", help="the output's long side in pixels, the other "
                      "in proportion (default: output.long_side)")
    _self_ensemble(p)
    _common(p)

    p = sub.add_parser(
        "backfill", help="upscale a whole archive on Ray (one machine or a cluster), resumably",
        description="Upscale every image under SRC into DST (same relative paths) on Ray Data: decoding and "
        "encoding on CPU workers, the model in an actor pool (one per GPU, else a few CPU actors). Outputs are "
        "published like the daemon's (temp name, fsync, rename, never overwritten); a second run skips finished "
        "outputs. Failures, with reasons, go to DST/.upscaled-backfill/failures.jsonl; exits 1 if any. "
        "Needs pip install 'upscaled[ray]'. See docs/scaling.md.",
    )
    p.add_argument("src", metavar="SRC", help="folder of images (read recursively)")
    p.add_argument("dst", metavar="DST", help="folder for the upscaled images")
    p.add_argument("--ray", metavar="ADDRESS", help="join this Ray cluster (host:port, or auto for the one this "
                   "machine is in); default: start a local Ray for this run")
    p.add_argument("--workers", type=int, metavar="N", help="model actors (default: one per GPU; without GPUs, one "
                   "per 16 cores of each node)")
    p.add_argument("--model", metavar="PATH", help="checkpoint file, or `fidelity` / `gan` for a bundled model "
                   "(default: the configured, published or bundled fidelity one); the same path on every node")
    p.add_argument("--format", choices=["png", "jpg", "webp"], help="output format (default: output.format)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--outscale", type=_outscale, metavar="X", help="the output's size as a factor of the "
                      "input's, as for upscale")
    size.add_argument("--long-side", type=_long_side, metavar="N", help="the output's long side in pixels")
    _common(p)

    p = sub.add_parser(
        "serve", help="run the hot-folder daemon",
        description="Watch the inbox and upscale every image that lands in it into the outbox; "
        "originals go to done/ (or failed/ with a reason). SIGTERM/SIGINT stop gracefully, SIGHUP reloads.",
    )
    p.add_argument("--once", action="store_true", help="process what is in the inbox now, then exit (no watching)")
    _common(p)

    p = sub.add_parser("status", help="show the running daemon's status",
                       description="Read the status file the daemon keeps current.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _common(p)

    p = sub.add_parser(
        "train", help="train (or fine-tune) the generator",
        description="Train the SRGAN generator: L1 pre-training, then the GAN. Flags override the "
        "config's trainer section. A new run's network is the bundled fidelity model's layout (24 blocks x 32 "
        "channels, low-resolution tail, bilinear skip) unless trainer.generator_* say otherwise; --init starts "
        "from a checkpoint's weights and layout instead.",
    )
    p.add_argument("--data", metavar="DIR", help="folder of high-resolution images (LR made on the fly)")
    p.add_argument("--paired-lr", metavar="DIR", help="folder of low-resolution images, matched by name with --paired-hr")
    p.add_argument("--paired-hr", metavar="DIR", help="folder of high-resolution images, matched by name with --paired-lr")
    p.add_argument("--val", metavar="DIR", help="folder of validation images (HR)")
    p.add_argument("--steps", type=int, metavar="N", help="total training steps (pre-training included)")
    p.add_argument("--out", metavar="RUN_DIR", help="run folder (state, metrics, samples, best.safetensors)")
    p.add_argument("--init", metavar="CHECKPOINT", help="start from this checkpoint (fine-tune); 'current' = the model the daemon serves now, "
                   "'fidelity' / 'gan' = a bundled model")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last state")
    p.add_argument("--restart", action="store_true", help="start over in an --out that already holds a run (its checkpoints are replaced)")
    p.add_argument("--publish", action="store_true", help="promote the best model to the models folder if it beats the current one")
    _common(p)

    p = sub.add_parser(
        "learn", help="fine-tune the served model on the images the daemon kept (learn.keep_mb)",
        description="Fine-tune the served model on the folder's own images (kept in paths.learn while learn.keep_mb "
        "> 0), mixed with trainer.data; publish the result only if it gains learn.min_gain_db on a held-out slice of "
        "them and loses at most learn.max_regression_db on trainer.val. The running daemon swaps it in. Prints served "
        "vs candidate on both. Too little material: says so and exits 0.",
    )
    p.add_argument("--minutes", type=float, metavar="N", help="wall-clock budget, measuring included (default: learn.minutes)")
    p.add_argument("--teacher", metavar="MODEL", help="an imported model (a `models list` version or a file) whose x4 "
                   "of crops at their own size are extra targets (default: learn.teacher)")
    p.add_argument("--no-publish", action="store_true", help="train and measure, never publish")
    _common(p)

    p = sub.add_parser(
        "eval", help="measure a model against bicubic and Lanczos",
        description="PSNR/SSIM on the Y channel (BT.601, scale-pixel border shaved, 8-bit outputs) "
        "on a folder of HR images, downscaled with antialiased bicubic.",
    )
    p.add_argument("--data", required=True, metavar="DIR", help="folder of high-resolution images")
    p.add_argument("--model", metavar="PATH", help="checkpoint file, a bundled model (fidelity, gan, real), or a version from "
                   "`upscaled models list` (imported ones too) (default: the configured, published or bundled fidelity one)")
    p.add_argument("--max-images", type=int, default=0, metavar="N", help="only the first N images (sorted by path)")
    p.add_argument("--peer", action="append", choices=["span"], help="also measure another upscaler in the same run: "
                   "span = SPAN x4 (NTIRE 2024 efficient-SR winner) through ncnn; needs pip install -e '.[peers]'")
    p.add_argument("--lr-jpeg", type=int, metavar="Q", help="save each low-resolution image as a JPEG of quality Q "
                   "before upscaling (compressed inputs), for every method")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _self_ensemble(p)
    _common(p)

    p = sub.add_parser(
        "web", help="the web page, /metrics and health endpoints beside the daemon",
        description="Serve a page to watch the queue, compare before and after, drop files, promote models and "
        "train; plus /metrics (Prometheus), /healthz and /readyz. Reads what the daemon writes; binds 127.0.0.1 by "
        "default. Needs pip install 'upscaled[web]'. See docs/web.md.",
    )
    p.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (default: web.listen, 127.0.0.1:8470); "
                   "anything but loopback needs web.token / web.token_file, or web.read_only")
    _common(p)

    p = sub.add_parser(
        "models", help="list, show, import, promote and roll back served models",
        description="Manage the models folder (paths.models) the daemon serves from. The daemon picks "
        "up every change of the current model by itself.",
    )
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    q = msub.add_parser("list", help="the bundled models, then the published versions, newest last; * marks the current one, > what the running daemon serves")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    _common(q)
    q = msub.add_parser("show", help="one version's metadata as JSON (a version, or bundled / fidelity / gan)")
    q.add_argument("version", help="version id or file name")
    q.add_argument("--json", action="store_true", help="everything as stored: the whole licence, raw hyperparameters")
    _common(q)
    q = msub.add_parser("promote", help="verify a checkpoint and make it the current model",
                        description="Verify PATH with the same checks the daemon makes, then publish it as the current model.")
    q.add_argument("path", help="checkpoint (.safetensors), or a version in the models folder (an imported one, say)")
    q.add_argument("--gate", metavar="VAL_DIR", help="also require it to beat the current model on these HR images")
    q.add_argument("--force", action="store_true", help="promote even a model below bicubic or the served model on the probe")
    _common(q)
    q = msub.add_parser(
        "import", help="convert a model trained elsewhere (ESRGAN, SPAN, SwinIR, DAT, HAT, ...) into the models folder",
        description="Read a super-resolution checkpoint of any architecture spandrel recognises (.pth, .pt, .ckpt: "
        "weights only, never code; or .safetensors) and store it in upscaled's format in the models folder. It is "
        "served once promoted (upscaled models promote VERSION). Models carry their own licences: check yours.")
    q.add_argument("file", help="the checkpoint to import")
    q.add_argument("--name", help="a name for it (default: the file's name); its version is NAME-<digest>")
    q.add_argument("--val", metavar="VAL_DIR", help="evaluate it on these HR images and store the metrics, so "
                   "`models list` compares it with the others on the same set")
    q.add_argument("--license", metavar="TEXT_OR_FILE", help="licence text (or a file holding it) to keep with it")
    _common(q)
    q = msub.add_parser("rollback", help="serve what was served before (one step at a time, down to the bundled "
                        "default), or a named version, or bundled / fidelity / gan")
    q.add_argument("version", nargs="?", help="version id, file name, or bundled / fidelity / gan (default: one step back)")
    _common(q)
    return parser


def _run(args: argparse.Namespace) -> int:
    from core import config as config_mod

    given = args.config or args.config_before
    config_path = Path(given) if given else config_mod.default_path()
    if args.command == "status":
        from daemon.status import main as status

        # The daemon's status, not the config's validity: a file being edited must not hide it.
        try:
            cfg = config_mod.load_file(config_path, args.set)
        except config_mod.ConfigError as e:
            if args.set:  # a wrong --set is an error, as for every command; only a broken file is read past
                try:
                    config_mod.load_file(config_path)
                except config_mod.ConfigError:
                    config_mod.load_file(None, args.set)  # the file is broken: check the --set on its own
                else:
                    raise
            path = config_mod.status_path_despite(config_path)
            logger.warning("the config is invalid ({}); reading the daemon's status from {}", e, path)
            return status(None, as_json=args.json, path=path)
        return status(cfg, as_json=args.json)
    cfg = config_mod.load_file(config_path, args.set + _size_overrides(args))
    if getattr(args, "self_ensemble", None):
        cfg = dataclasses.replace(cfg, inference=dataclasses.replace(cfg.inference, self_ensemble=args.self_ensemble))
    if args.command == "upscale":
        from upscaled.upscale import run

        return run(cfg, args.inputs, Path(args.output), args.model, args.format, args.overwrite, quiet=args.quiet)
    if args.command == "backfill":
        from upscaled.backfill import run as backfill

        if args.format:
            cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, format=args.format))
        return backfill(cfg, args.src, args.dst, args.model, args.ray, args.workers, quiet=args.quiet)
    if args.command == "serve":
        from daemon.service import main as serve

        # The file is re-read on SIGHUP; None means built-in defaults, nothing to re-read.
        return serve(cfg, once=args.once, config_path=config_path.resolve() if config_path else None, overrides=args.set)
    if args.command == "train":
        from trainer.train import main as train

        return train(cfg, args)
    if args.command == "learn":
        from trainer.learn import main as learn

        return learn(cfg, args)
    if args.command == "eval":
        from trainer.evaluate import main as evaluate

        return evaluate(cfg, args)
    if args.command == "models":
        from upscaled.models_cmd import main as models

        return models(cfg, args)
    if args.command == "web":
        from web.server import main as web

        return web(cfg, args.listen, config_path=config_path.resolve() if config_path else None, overrides=args.set)
    raise AssertionError(f"unhandled command {args.command}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from core.logs import setup_logging

    setup_logging(getattr(args, "verbose", False), getattr(args, "quiet", False))
    from core.errors import CheckpointError, UsageError  # no torch import: `upscaled status` stays instant
    from core.config import ConfigError

    try:
        return _run(args)
    except UsageError as e:
        logger.error("{}", e)
        return EXIT_USAGE
    except ConfigError as e:
        logger.error("config error: {}", e)
        return EXIT_USAGE
    except CheckpointError as e:
        logger.error("model error: {}", e)
        return EXIT_USAGE
    except KeyboardInterrupt:
        logger.warning("interrupted")
        return 130
    except BrokenPipeError:
        # `upscaled status | head`: the reader left; that is not an error. Point stdout at
        # /dev/null so the interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
