"""From a folder on disk to a running server: `prepare` loads the model, its tokenizer and a backend and
builds the app; `serve` runs it under uvicorn until interrupted, then closes the backend.

The folder is either one `RunResult.save` wrote (loaded by `optistack.load_model`, which checks every
file against the manifest) or a plain Hugging Face causal-LM folder (safetensors weights only). A saved
folder holds no tokenizer; it is found, in this order: `tokenizer=` (a folder), tokenizer files in the
folder itself, the bundled SmolLM2 when the manifest names that workload, the original model's folder
when the manifest's model id is one that still exists. Anything that does not fit is one ServingError.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import sys
from pathlib import Path
from typing import Any, Callable

from .backend import ServingError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
WHAT = "a folder written by RunResult.save (optistack.json) or a Hugging Face causal-LM folder (config.json)"


@dataclasses.dataclass
class Served:
    app: Any  # the Starlette app
    backend: Any
    tokenizer: Any
    model: Any
    model_name: str


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def _read_tokenizer(folder: Path, why: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise ServingError(f"cannot read the tokenizer in {folder} ({why}): {' '.join(str(exc).split())[:200]}") from None


def find_tokenizer(folder: Path, workload: dict[str, Any] | None, explicit: str | Path | None = None) -> Any:
    """The tokenizer for the model in `folder` (see the module docstring for the order)."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_dir() or not _has_tokenizer(path):
            raise ServingError(f"--tokenizer {explicit}: not a folder with tokenizer files ({', '.join(TOKENIZER_FILES)})")
        return _read_tokenizer(path, "--tokenizer")
    if _has_tokenizer(folder):
        return _read_tokenizer(folder, "beside the model")
    workload = workload or {}
    if workload.get("name") == "smollm2":
        from ..bundled_models import smollm2_dir

        return _read_tokenizer(smollm2_dir(), "the bundled SmolLM2's")
    source = workload.get("model_id")
    if isinstance(source, str) and Path(source).is_dir() and _has_tokenizer(Path(source)):
        return _read_tokenizer(Path(source), "the original model's folder")
    raise ServingError(f"{folder} holds no tokenizer and its manifest names none that exists here: give --tokenizer FOLDER "
                       "(the original model's folder), or copy its tokenizer files into the saved folder")


def _hf_model(folder: Path) -> Any:
    if not any(folder.glob("*.safetensors")):
        raise ServingError(f"{folder} has config.json but no *.safetensors weights (pickled .bin weights are not loaded)")
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    except Exception as exc:
        raise ServingError(f"{folder} is not a causal LM transformers can load: {' '.join(str(exc).split())[:200]}") from None


def load_folder(path: str | Path) -> tuple[Any, dict[str, Any] | None]:
    """(model, the manifest's workload facts or None) for `path`; one ServingError / LoadError otherwise."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ServingError(f"{path}: no such folder; expected {WHAT}")
    if not folder.is_dir():
        raise ServingError(f"{path} is a file; expected {WHAT}")
    from ..core.checksums import MANIFEST

    if (folder / MANIFEST).is_file():
        from ..checkpoints.loadables import load_model
        from ..core.checksums import read_manifest

        model = load_model(folder)
        workload = read_manifest(Path(os.path.realpath(folder))).get("workload")
        return model, workload if isinstance(workload, dict) else None
    if (folder / "config.json").is_file():
        return _hf_model(folder), None
    raise ServingError(f"{path} is not a model folder: no optistack.json or config.json; expected {WHAT}")


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """The eos ids of the tokenizer and of the model's generation config."""
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        ids.update([value] if isinstance(value, int) else list(value or []))
    return sorted(ids)


BACKENDS = ("auto", "simple")
KV_CHOICES = ("auto", "float16", "float32", "int8")


def make_backend(model: Any, tokenizer: Any, max_batch: int, max_context: int | None,
                 backend: str | Callable[..., Any] | None, kv: str | None = None) -> Any:
    """`backend`: "auto" (None) picks `serving.backends_for(model)`, the best this package has for the model;
    "simple" is SimpleBackend (one request at a time through `generate()`); or a factory
    `f(model, max_batch=, max_context=) -> Backend`. `kv`: the engine's KV cache type (auto only)."""
    if kv is not None and backend not in (None, "auto"):
        raise ServingError(f"kv chooses the decode engine's KV cache (backend auto); backend {backend!r} has its own")
    if callable(backend):
        return backend(model, max_batch=max_batch, max_context=max_context)
    if backend == "simple":
        from .simple_backend import SimpleBackend

        return SimpleBackend(model, max_context)
    from . import backends_for

    return backends_for(model, tokenizer, max_batch=max_batch, max_context=max_context, kv=kv)


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if type(value) is not int or value < low or (high is not None and value > high):
        raise ServingError(f"{name} must be an integer >= {low}{'' if high is None else f' and <= {high}'}; got {value!r}")


def prepare(saved_dir: str | Path, *, max_batch: int = 8, max_context: int | None = None, threads: int | None = None,
            tokenizer: str | Path | None = None, model_name: str | None = None,
            backend: str | Callable[..., Any] | None = None, kv: str | None = None) -> Served:
    """Load `saved_dir` and build the app (nothing listens yet); close `served.backend` when done."""
    _check_int("max_batch", max_batch, 1)
    if kv not in (None, *KV_CHOICES):
        raise ServingError(f"kv must be one of {', '.join(KV_CHOICES)}; got {kv!r}")
    if not callable(backend) and backend not in (None, *BACKENDS):
        raise ServingError(f"backend must be one of {', '.join(BACKENDS)} or a factory f(model, max_batch=, max_context=); "
                           f"got {backend!r}")
    if max_context is not None:
        _check_int("max_context", max_context, 2)
    if threads is not None:
        _check_int("threads", threads, 1)
        import torch

        torch.set_num_threads(threads)
    model, workload = load_folder(saved_dir)
    if not callable(getattr(model, "generate", None)):
        raise ServingError(f"{saved_dir} holds a {type(model).__name__}, which cannot generate text; serve needs a causal LM")
    tok = find_tokenizer(Path(saved_dir).expanduser(), workload, tokenizer)
    name = model_name or Path(os.path.realpath(Path(saved_dir).expanduser())).name
    made = make_backend(model, tok, max_batch, max_context, backend, None if kv == "auto" else kv)
    from .http import create_app

    try:
        app = create_app(made, tok, name, stop_token_ids=stop_ids(model, tok))
    except BaseException:
        made.close()
        raise
    return Served(app=app, backend=made, tokenizer=tok, model=model, model_name=name)


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket (a port in use is one ServingError, not a stack trace from uvicorn)."""
    _check_int("port", port, 0, 65535)
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(128)
    except OSError as exc:
        raise ServingError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def serve(saved_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, *,
          log_level: str = "info", **options: Any) -> None:
    """Serve `saved_dir` on http://host:port until interrupted (Ctrl-C); `options` go to `prepare`."""
    import uvicorn

    sock = listen(host, port)
    try:
        served = prepare(saved_dir, max_batch=max_batch, **options)
    except BaseException:
        sock.close()
        raise
    bound = sock.getsockname()[1]
    b = served.backend
    print(f"optistack serve: '{served.model_name}' on http://{host}:{bound}/v1 (backend: {b.name}; context "
          f"{b.max_context} tokens{'; one request at a time' if b.name == 'simple' else f'; max batch {max_batch}'})",
          file=sys.stderr)
    config = uvicorn.Config(served.app, log_level=log_level, timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down cleanly, then re-raised the Ctrl-C it caught
        pass
    finally:
        b.close()
        sock.close()
    print("optistack serve: stopped", file=sys.stderr)


def add_serve_args(p: Any) -> None:
    """`optistack serve`'s options (cli.py adds the subcommand)."""
    p.add_argument("saved_dir", help="a folder written by RunResult.save (optistack.load_model reads it), or a Hugging "
                                     "Face causal-LM folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one, printed at start)")
    p.add_argument("--max-batch", type=int, default=8, help="most requests decoded together (batching backends)")
    p.add_argument("--max-context", type=int, default=None,
                   help="most tokens (prompt + completion) per request (default: the backend's own, shown by /health)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--tokenizer", default=None, help="folder with the tokenizer, when the saved folder has none")
    p.add_argument("--model-name", default=None, help="the model id clients name (default: the folder's name)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: the best batching backend for the model; simple: one request at a time through generate()")
    p.add_argument("--kv", choices=KV_CHOICES, default="auto",
                   help="the decode engine's KV cache (auto: as the decode-engine step was told, else int8 with int8 "
                        "activations, float32 in the exact mode)")


def serve_from_args(args: Any) -> int:
    serve(args.saved_dir, host=args.host, port=args.port, max_batch=args.max_batch, max_context=args.max_context,
          threads=args.threads, tokenizer=args.tokenizer, model_name=args.model_name, backend=args.backend,
          kv=args.kv)
    return 0
