"""Command line: ``python -m nnfast train|bench`` (also installed as ``nnfast``).

``nnfast train`` with no arguments trains a 64-128-10 ReLU network on the bundled UCI
digits (held-out test split), prints per-epoch progress, the test accuracy and the time
taken; ``--compare-numpy`` then times the same fit on the NumPy reference backend and
prints the speed-up. ``nnfast bench ...`` forwards its arguments to ``nnfast.bench``.

Errors (missing file, bad column, bad option value, invalid data) print one line
``nnfast: error: ...`` on stderr and exit with status 2 (1 when training diverges).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import time
from typing import List, Optional, Sequence

import numpy as np

PROG = "nnfast"
_DEFAULTS = {"layers": "128", "activation": "relu", "epochs": 15, "batch_size": 32,
             "sgd_lr": 0.1, "adam_lr": 1e-3, "momentum": 0.9, "seed": 0,
             "test_size": 0.2, "repeats": 5}


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status ``code``."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage block)."""

    def error(self, message):  # noqa: D102 - argparse API
        sys.stderr.write(f"{PROG}: error: {message} (see '{self.prog} --help')\n")
        sys.exit(2)


# --- option value types --------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _batch_size(text: str):
    if text.strip().lower() in ("full", "none", "all"):
        return None
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or 'full', got {text!r}") from None


def _float_in(low=None, high=None, low_open=False, high_open=False, what="a number"):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        ok = math.isfinite(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


def _hidden_layers(text: str) -> List[int]:
    """'128,64' -> [128, 64]; '' or 'none' -> [] (no hidden layer)."""
    text = text.strip()
    if text.lower() in ("", "none"):
        return []
    sizes = []
    for part in text.split(","):
        part = part.strip()
        try:
            size = int(part)
        except ValueError:
            size = 0
        if size < 1:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated positive layer sizes like '128,64', got {text!r}")
        sizes.append(size)
    return sizes


def _activation_names() -> List[str]:
    from .layers import ACTIVATIONS
    return sorted(name for name in ACTIVATIONS if name != "softmax")


# --- the parser ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = _Parser(prog=PROG, description="nnfast: a fast, minimal MLP engine for the CPU.")
    parser.add_argument("--version", action="version", version=f"nnfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,bench}", parser_class=_Parser)

    t = sub.add_parser(
        "train", help="train a classifier (default: the bundled digits) and report accuracy",
        description="Train a multilayer perceptron classifier (softmax cross-entropy). "
                    "Without --data it uses the bundled UCI handwritten digits "
                    "(1,797 8x8 images, 10 classes) with a 64-128-10 ReLU network, SGD "
                    "(lr 0.1, momentum 0.9), batch 32, 15 epochs.")
    g = t.add_argument_group("data")
    g.add_argument("--data", metavar="PATH",
                   help="your own data: .npz with arrays X and y, or .csv (optionally .csv.gz) "
                        "with a header row, the label column named by --label-column and "
                        "numeric feature columns (features are used as given: scale them to "
                        "about [0, 1] yourself)")
    g.add_argument("--label-column", default="label", metavar="NAME",
                   help="label column of a .csv file (default: label)")
    g.add_argument("--test-size", type=_float_in(0, 1, True, True, "a fraction in (0, 1)"),
                   default=_DEFAULTS["test_size"], metavar="FRACTION",
                   help="fraction of the samples held out for testing (default: 0.2)")
    g = t.add_argument_group("model")
    g.add_argument("--layers", type=_hidden_layers, default=_DEFAULTS["layers"],
                   metavar="SIZES",
                   help="hidden layer sizes, comma-separated, '' for none (default: 128)")
    g.add_argument("--activation", choices=_activation_names(),
                   default=_DEFAULTS["activation"],
                   help="activation of the hidden layers (default: relu)")
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="precision (default: float32)")
    g.add_argument("--backend", choices=("cython", "numpy"), default="cython",
                   help="compiled kernels or the NumPy reference (default: cython)")
    g = t.add_argument_group("training")
    g.add_argument("--epochs", type=_positive_int, default=_DEFAULTS["epochs"], metavar="N",
                   help=f"passes over the training data (default: {_DEFAULTS['epochs']})")
    g.add_argument("--batch-size", type=_batch_size, default=_DEFAULTS["batch_size"],
                   metavar="N", help="samples per iteration, or 'full' (default: 32)")
    g.add_argument("--accumulate", type=_positive_int, default=1, metavar="K",
                   help="iterations (micro-batches) per optimizer step (default: 1)")
    g.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                   help="(default: sgd)")
    g.add_argument("--lr", type=_float_in(0, None, True, False, "a positive number"),
                   default=None,
                   help=f"learning rate (default: {_DEFAULTS['sgd_lr']} for sgd, "
                        f"{_DEFAULTS['adam_lr']} for adam)")
    g.add_argument("--momentum", type=_float_in(0, 1, False, True, "a number in [0, 1)"),
                   default=None, help=f"SGD momentum (default: {_DEFAULTS['momentum']})")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum (SGD)")
    g.add_argument("--weight-decay", type=_float_in(0, None, what="a number >= 0"),
                   default=0.0, metavar="WD", help="L2 weight decay (default: 0)")
    g.add_argument("--seed", type=int, default=_DEFAULTS["seed"],
                   help="seed of the split, the initial weights and the shuffling "
                        "(default: 0)")
    g.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="threads for the kernels and BLAS (default: all available)")
    g = t.add_argument_group("output")
    g.add_argument("--quiet", action="store_true", help="no per-epoch progress lines")
    g.add_argument("--save", metavar="PATH", help="save the trained model (.npz; nf.load)")
    g.add_argument("--checkpoint", metavar="PATH",
                   help="write a training checkpoint (atomically) at every epoch end, or "
                        "every --checkpoint-every optimizer steps")
    g.add_argument("--checkpoint-every", type=_positive_int, default=None, metavar="STEPS",
                   help="checkpoint every STEPS optimizer steps (default: each epoch end)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run held in --checkpoint if that file exists "
                        "(same options required); start afresh otherwise")
    g.add_argument("--plot", metavar="PNG", help="plot the loss/accuracy curves (matplotlib)")
    g.add_argument("--compare-numpy", action="store_true",
                   help="also time the same fit on the NumPy reference backend and print "
                        "the speed-up (fit calls only, best of --repeats)")
    g.add_argument("--repeats", type=_positive_int, default=_DEFAULTS["repeats"], metavar="R",
                   help="timed fits per backend for --compare-numpy (default: "
                        f"{_DEFAULTS['repeats']})")

    sub.add_parser("bench", add_help=False,
                   help="run the benchmark suite (arguments go to nnfast.bench; "
                        "see 'nnfast bench --help')")
    return parser


# --- data ------------------------------------------------------------------------------------
def _one_line(text) -> str:
    return " ".join(str(text).split())


def _load_npz(path: str):
    import zipfile
    if not zipfile.is_zipfile(path):
        raise CLIError(f"{path} is not a .npz file (write one with numpy.savez(path, X=..., "
                       "y=...))")
    try:
        with np.load(path, allow_pickle=False) as data:
            names = list(data.files)
            missing = [k for k in ("X", "y") if k not in names]
            if missing:
                raise CLIError(f"{path} has no array {missing[0]!r} (arrays found: "
                               f"{', '.join(names) or 'none'}); save it with "
                               "numpy.savez(path, X=..., y=...)")
            X, y = data["X"], data["y"]
    except CLIError:
        raise
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise CLIError(f"cannot read {path}: {exc.strerror or exc}") from None
        raise CLIError(f"{path} is not a readable .npz file ({_one_line(exc)})") from None
    return X, y


def _load_csv(path: str, label_column: str):
    import csv
    import gzip
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            rows, lines = [], []
            for row in reader:
                if row and any(c.strip() for c in row):
                    rows.append(row)
                    lines.append(reader.line_num)
    except (OSError, UnicodeDecodeError, csv.Error, EOFError) as exc:
        raise CLIError(f"cannot read {path} as CSV ({_one_line(exc)})") from None
    if not rows:
        raise CLIError(f"{path} is empty")
    header = [c.strip() for c in rows[0]]
    if label_column not in header:
        shown = ", ".join(header[:20]) + (", ..." if len(header) > 20 else "")
        raise CLIError(f"{path} has no column {label_column!r} (columns: {shown}); "
                       "name the label column with --label-column")
    if header.count(label_column) > 1:
        raise CLIError(f"{path} has more than one column named {label_column!r}")
    body = rows[1:]
    lines = lines[1:]
    if not body:
        raise CLIError(f"{path} has a header but no data rows")
    if len(header) < 2:
        raise CLIError(f"{path} has no feature columns besides {label_column!r}")
    width = len(header)
    for i, row in enumerate(body):
        if len(row) != width:
            raise CLIError(f"{path}, line {lines[i]}: {len(row)} fields, the header has "
                           f"{width}")
    li = header.index(label_column)
    table = np.array(body, dtype=str)
    labels = np.char.strip(table[:, li])
    feats = np.char.strip(np.delete(table, li, axis=1))
    try:
        X = feats.astype(np.float64)
    except ValueError:
        names = [h for j, h in enumerate(header) if j != li]
        for r in range(feats.shape[0]):
            for c in range(feats.shape[1]):
                try:
                    float(feats[r, c])
                except ValueError:
                    raise CLIError(f"{path}, line {lines[r]}, column {names[c]!r}: "
                                   f"{str(feats[r, c])!r} is not a number") from None
        raise  # pragma: no cover - numpy refused what float() accepts
    if np.any(labels == ""):
        r = int(np.flatnonzero(labels == "")[0])
        raise CLIError(f"{path}, line {lines[r]}: empty label")
    for kind in (np.int64, np.float64):
        try:
            return X, labels.astype(kind)
        except (ValueError, OverflowError):
            pass
    return X, labels  # string class names


def _prepare(X, y, source: str):
    """(X float64 2-D, y for fit, number of classes, mapping note or None)."""
    X = np.asarray(X)
    y = np.asarray(y)
    if X.dtype.kind not in "biuf":
        raise CLIError(f"{source}: X must be numeric, got dtype {X.dtype}")
    if X.ndim == 0 or X.shape[0] == 0:
        raise CLIError(f"{source}: X holds no samples")
    if X.ndim == 1:
        X = X.reshape(-1, 1)
    elif X.ndim > 2:
        X = X.reshape(X.shape[0], -1)
    if X.shape[1] == 0:
        raise CLIError(f"{source}: X has no features")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim == 0 or y.shape[0] != X.shape[0]:
        raise CLIError(f"{source}: X has {X.shape[0]} samples but y has "
                       f"{y.shape[0] if y.ndim else 0} labels")
    if not np.isfinite(X).all():
        raise CLIError(f"{source}: X contains NaN or infinity")
    note = None
    if y.ndim == 2:  # one-hot or probability rows
        if y.dtype.kind not in "biuf" or not np.isfinite(y).all():
            raise CLIError(f"{source}: 2-D y must hold finite class probabilities")
        n_classes = y.shape[1]
        y = y.astype(np.float64)
    elif y.ndim != 1:
        raise CLIError(f"{source}: y must be 1-D class labels (or 2-D one-hot rows), got "
                       f"shape {y.shape}")
    else:
        if y.dtype.kind == "f":
            if not np.isfinite(y).all():
                raise CLIError(f"{source}: y contains NaN or infinity")
            if not np.array_equal(y, np.round(y)):
                bad = y[y != np.round(y)][0]
                raise CLIError(f"{source}: labels must be class labels, got the non-integer "
                               f"value {bad:g} (nnfast train does classification)")
            y = y.astype(np.int64)
        elif y.dtype.kind not in "biuUS":
            raise CLIError(f"{source}: labels of dtype {y.dtype} are not supported")
        classes, y_idx = np.unique(y, return_inverse=True)
        y_idx = y_idx.reshape(-1).astype(np.int64)
        if classes.shape[0] < 2:
            raise CLIError(f"{source}: need at least 2 classes, all labels are "
                           f"{classes[0].item()!r}")
        identity = (classes.dtype.kind in "biu" and
                    np.array_equal(classes, np.arange(classes.shape[0])))
        n_classes = int(classes.shape[0])
        if not identity:
            shown = ", ".join(f"{c}->{i}" for i, c in enumerate(classes[:12].tolist()))
            note = f"labels mapped to output indices: {shown}" + (", ..." if n_classes > 12
                                                                   else "")
        y = y_idx
    return X, y, n_classes, note


def _load_data(args):
    from . import datasets
    if args.data is None:
        X, y = datasets.load_digits()
        desc = "bundled UCI handwritten digits (8x8)"
        X, y, k, note = _prepare(X, y, "digits")
    else:
        path = args.data
        if not os.path.exists(path):
            raise CLIError(f"data file not found: {path}")
        if os.path.isdir(path):
            raise CLIError(f"--data expects a file, {path} is a folder")
        lower = path.lower()
        if lower.endswith(".npz"):
            X, y = _load_npz(path)
        elif lower.endswith(".csv") or lower.endswith(".csv.gz"):
            X, y = _load_csv(path, args.label_column)
        else:
            raise CLIError(f"--data must be a .npz (arrays X, y) or .csv file, got {path}")
        desc = path
        X, y, k, note = _prepare(X, y, path)
    if X.shape[0] < 2:
        raise CLIError(f"{desc}: need at least 2 samples to split into train and test")
    Xtr, Xte, ytr, yte = datasets.train_test_split(X, y, test_size=args.test_size,
                                                   seed=args.seed)
    return desc, X.shape, k, note, (Xtr, Xte, ytr, yte)


# --- model and optimizer ---------------------------------------------------------------------
def _make_model(args, n_in: int, n_out: int, backend: str):
    import nnfast as nf
    sizes = [n_in] + list(args.layers) + [n_out]
    layers = [nf.Dense(sizes[i], sizes[i + 1],
                       activation=args.activation if i < len(sizes) - 2 else "softmax")
              for i in range(len(sizes) - 1)]
    return nf.Sequential(*layers, dtype=args.dtype, seed=args.seed, backend=backend)


def _make_optimizer(args):
    import nnfast as nf
    if args.optimizer == "adam":
        return nf.Adam(lr=args.lr, weight_decay=args.weight_decay)
    return nf.SGD(lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
                  weight_decay=args.weight_decay)


def _check_options(args) -> None:
    if args.optimizer == "adam":
        if args.momentum is not None or args.nesterov:
            raise CLIError("--momentum and --nesterov apply to --optimizer sgd only")
        if args.lr is None:
            args.lr = _DEFAULTS["adam_lr"]
    else:
        if args.lr is None:
            args.lr = _DEFAULTS["sgd_lr"]
        if args.momentum is None:
            args.momentum = _DEFAULTS["momentum"]
        if args.nesterov and args.momentum == 0:
            raise CLIError("--nesterov needs --momentum > 0")
    if args.compare_numpy and args.backend == "numpy":
        raise CLIError("--compare-numpy compares against the NumPy backend: train with "
                       "--backend cython")
    if (args.resume or args.checkpoint_every) and not args.checkpoint:
        raise CLIError("--resume and --checkpoint-every need --checkpoint PATH")
    for opt, path in (("--data", args.data), ("--save", args.save), ("--plot", args.plot),
                      ("--checkpoint", args.checkpoint)):
        if path == "":   # not "the option left out"
            raise CLIError(f"{opt}: empty path")
    for opt, path in (("--save", args.save), ("--plot", args.plot),
                      ("--checkpoint", args.checkpoint)):
        if path:
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder):
                raise CLIError(f"{opt}: folder {folder} does not exist")
            if os.path.isdir(path):
                raise CLIError(f"{opt}: {path} is a folder, give a file name")
    outputs = [(opt, os.path.realpath(path)) for opt, path in
               (("--save", args.save), ("--plot", args.plot), ("--checkpoint", args.checkpoint))
               if path]
    data = os.path.realpath(args.data) if args.data else None
    for i, (opt, path) in enumerate(outputs):
        if path == data:
            raise CLIError(f"{opt} names the --data file {args.data}: it would be overwritten")
        for other, path2 in outputs[i + 1:]:
            if path == path2:
                raise CLIError(f"{opt} and {other} name the same file {path}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CLIError("--plot needs matplotlib: pip install matplotlib "
                           "(or pip install 'nnfast[plot]')") from None


@contextlib.contextmanager
def _progress_logging(enabled: bool):
    """Show the "nnfast" logger's INFO records (fit's per-epoch lines) on stderr while
    training; the logger's previous configuration is restored afterwards, so calling
    ``main()`` in-process leaves no trace."""
    logger = logging.getLogger("nnfast")
    if not enabled or logger.handlers:
        yield
        return
    saved = (logger.level, logger.propagate)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        handler.flush()
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _fit_kwargs(args):
    return dict(loss="cross_entropy", epochs=args.epochs, batch_size=args.batch_size,
                accumulate=args.accumulate, shuffle=True, seed=args.seed)


def _timed_fits(args, backends, data, n_in, n_out):
    """Best wall time of ``args.repeats`` fresh fits (the fit call only) per backend, the
    backends taking turns so a change in machine load hits both alike; and the last
    model of each backend."""
    Xtr, _, ytr, _ = data
    best = {b: math.inf for b in backends}
    models = {}
    for _ in range(args.repeats):
        for backend in backends:
            model = _make_model(args, n_in, n_out, backend)
            opt = _make_optimizer(args)
            t0 = time.perf_counter()
            model.fit(Xtr, ytr, optimizer=opt, verbose=0, **_fit_kwargs(args))
            best[backend] = min(best[backend], time.perf_counter() - t0)
            models[backend] = model
    return best, models


def _plot(path, history, title) -> None:
    from .plotting import plot_history
    plot_history(history, path, title=title, val_label="test")


def _fmt_time(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def cmd_train(args) -> int:
    import nnfast as nf
    from .data import steps_per_epoch

    _check_options(args)
    if args.threads is not None:
        nf.set_num_threads(args.threads)
    desc, shape, n_classes, note, data = _load_data(args)
    Xtr, Xte, ytr, yte = data
    n_in = shape[1]
    model = _make_model(args, n_in, n_classes, args.backend)
    opt = _make_optimizer(args)
    steps = args.epochs * steps_per_epoch(Xtr.shape[0], args.batch_size, args.accumulate)
    sizes = "-".join(str(s) for s in [n_in] + list(args.layers) + [n_classes])
    hidden = f"{args.activation} hidden, " if args.layers else ""
    batch = "full batch" if args.batch_size is None else f"batch {args.batch_size}"
    if args.accumulate > 1:
        batch += f" x {args.accumulate} accumulated"

    print(f"data:  {desc}: {shape[0]} samples, {n_in} features, {n_classes} classes; "
          f"train {Xtr.shape[0]} / test {Xte.shape[0]} (seed {args.seed})")
    if note:
        print(f"       {note}")
    print(f"model: {sizes} ({hidden}softmax output), {model.n_params:,} parameters, "
          f"{args.dtype}, backend {args.backend}, {nf.get_num_threads()} thread(s)")
    print(f"train: {opt!r}, {batch}, {args.epochs} epochs ({steps} steps), seed {args.seed}")
    sys.stdout.flush()

    with _progress_logging(not args.quiet):
        t0 = time.perf_counter()
        hist = model.fit(Xtr, ytr, optimizer=opt, validation_data=(Xte, yte),
                         verbose=0 if args.quiet else 1, checkpoint=args.checkpoint,
                         checkpoint_every=args.checkpoint_every, resume=args.resume,
                         **_fit_kwargs(args))
        elapsed = time.perf_counter() - t0
    sys.stderr.flush()
    res = model.evaluate(Xte, yte)
    n_test = Xte.shape[0]
    print(f"test accuracy: {res['accuracy']:.4f} ({round(res['accuracy'] * n_test)}/{n_test}), "
          f"test loss {res['loss']:.4f}")
    print(f"time: {_fmt_time(elapsed)} to train {args.epochs} epochs "
          f"(with per-epoch test evaluation and progress output)")

    if args.save:
        model.save(args.save)
        print(f"saved model to {args.save} (load it with nnfast.load)")
    if args.plot:
        _plot(args.plot, hist, f"nnfast {sizes} on {os.path.basename(desc)}")
        print(f"saved training curves to {args.plot}")

    if args.compare_numpy:
        print(f"speed: the fit call alone (no test evaluation or progress output), best of "
              f"{args.repeats} runs per backend, same configuration and seed:")
        sys.stdout.flush()
        samples = args.epochs * Xtr.shape[0]
        best, models = _timed_fits(args, (args.backend, "numpy"), data, n_in, n_classes)
        t_fast, t_ref = best[args.backend], best["numpy"]
        ref_acc = models["numpy"].evaluate(Xte, yte)["accuracy"]
        print(f"  {args.backend:<6} backend: {_fmt_time(t_fast):>9}  "
              f"({samples / t_fast:,.0f} samples/s)")
        print(f"  numpy  backend: {_fmt_time(t_ref):>9}  ({samples / t_ref:,.0f} samples/s), "
              f"test accuracy {ref_acc:.4f}")
        ratio = t_ref / t_fast
        if ratio >= 1:
            print(f"nnfast ({args.backend}) is {ratio:.1f}x faster than the NumPy backend")
        else:
            print(f"nnfast ({args.backend}) is {1 / ratio:.1f}x slower than the NumPy backend "
                  "on this run")
    return 0


def cmd_bench(argv: Sequence[str]) -> int:
    try:
        from . import bench
    except ImportError as exc:
        raise CLIError(f"the benchmark runner is not available ({_one_line(exc)})") from None
    rc = bench.main(list(argv))
    return int(rc or 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m nnfast`` and the ``nnfast`` script; returns the exit
    status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "bench":
            return cmd_bench(argv[1:])
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:
            where = f"{PROG} {args.command}" if args.command else PROG
            sys.stderr.write(f"{PROG}: error: unrecognized arguments: {' '.join(extra)} "
                             f"(see '{where} --help')\n")
            return 2
        if args.command is None:
            parser.print_help(sys.stderr)
            sys.stderr.write(f"{PROG}: error: choose a command: train or bench\n")
            return 2
        return cmd_train(args)
    except CLIError as exc:
        sys.stderr.write(f"{PROG}: error: {_one_line(exc)}\n")
        return exc.code
    except FloatingPointError as exc:  # DivergenceError
        sys.stderr.write(f"{PROG}: error: training diverged: {_one_line(exc)} (try a "
                         "smaller --lr, or scale the features to about [0, 1])\n")
        return 1
    except (ValueError, TypeError, OSError, ImportError, MemoryError) as exc:
        sys.stderr.write(f"{PROG}: error: {_one_line(exc) or type(exc).__name__}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
