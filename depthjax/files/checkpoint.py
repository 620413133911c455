"""Native single-model checkpoints: `dj.save(model, path)` and `dj.load(path)`.

A checkpoint is a directory:

    config.json          ModelConfig.to_dict()
    program.json         Program.to_dict()
    params.safetensors   every parameter leaf, keyed by its "/"-joined path
    (tokenizer files)    anything passed as save(..., files=), e.g. a tokenizer.json
    manifest.json        format version, the parameter tree ("dtype[shape]" per leaf, so
                         empty subtrees survive) and the SHA-256 of every other file
                         (params.safetensors': the piecewise SHA-256 of
                         integrity.PieceDigest, hashed on every core, with its
                         "piece_bytes"); a sealed record (depthjax.files.integrity), so an
                         edit to any byte of any file -- config, program, weights,
                         tokenizer or the manifest itself -- is detected on load

A stitched model (dj.depth.stitch) is a directory of its own format, "depthjax-stitched":
`front/` and `back/` (each a checkpoint as above: model a with its program cut to the first
`at` steps, model b with its program from `resume`), `map.safetensors` (W [D_a, D_b],
c [D_b]) and a sealed manifest.json holding at, resume and the SHA-256 of map.safetensors,
of both parts' manifests (which cover their own files) and of any extra files. `load`
returns it as a `Stitched`; a loader that expects one model (depthjax.files.ModelDir,
every command) refuses it by name.

Saves are atomic (depthjax.files.atomic): everything is written to a staging directory beside
`path`, flushed, and swapped into place, so a reader sees the old checkpoint or the new
one, never a half-written one or none. Loading is bit-exact and checks the parameters
against the config.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..core import rows as rows_lib, sharding as sharding_lib
from ..core.config import ModelConfig
from ..core.model import DepthModel, init
from ..core.program import Program
from ..core.stitched import Stitched, check as check_stitched
from ..errors import DepthjaxError
from . import atomic, integrity, safetensors_io

FORMAT = "depthjax-checkpoint"
STITCHED = "depthjax-stitched"  # the format of a stitched model's directory
VERSION = 3  # 1: a CRC-32 of params.safetensors only; 2: its plain SHA-256 (both still read)
FILES = ("config.json", "program.json", "params.safetensors", "manifest.json")


class CheckpointError(DepthjaxError):
    """A checkpoint directory that is missing, incomplete, corrupt or inconsistent."""


# -- parameter trees <-> flat dicts ----------------------------------------------------
def flatten_params(params, prefix: str = "") -> dict:
    """{"a/b/c": leaf} for a nested dict of arrays (keys must be '/'-free strings)."""
    flat = {}
    for key, value in params.items():
        if not isinstance(key, str) or "/" in key or not key:
            raise CheckpointError(
                f"parameter key {prefix + str(key)!r}: keys must be non-empty strings without '/'"
            )
        path = prefix + key
        if isinstance(value, dict):
            flat.update(flatten_params(value, path + "/"))
        elif isinstance(value, (jax.Array, np.ndarray)):
            flat[path] = value
        else:
            raise CheckpointError(
                f"parameter {path!r} is a {type(value).__name__}; "
                "checkpoints hold nested dicts of arrays"
            )
    return flat


def _describe(params) -> dict:
    """The tree with each leaf replaced by 'dtype[d0,d1,...]'."""
    return {
        k: _describe(v)
        if isinstance(v, dict)
        else f"{np.dtype(v.dtype).name}[{','.join(map(str, v.shape))}]"
        for k, v in params.items()
    }


def _unflatten(tree: dict, flat: dict[str, np.ndarray], prefix: str = "") -> dict:
    out = {}
    for key, spec in tree.items():
        path = prefix + key
        if isinstance(spec, dict):
            out[key] = _unflatten(spec, flat, path + "/")
            continue
        if path not in flat:
            raise CheckpointError(f"params.safetensors lacks {path!r} listed in the manifest")
        arr = flat.pop(path)
        if _describe({key: arr})[key] != spec:
            raise CheckpointError(
                f"{path!r} is {_describe({key: arr})[key]} in "
                f"params.safetensors but {spec} in the manifest"
            )
        out[key] = arr
    return out


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


# -- save / load -----------------------------------------------------------------------
def save(model: DepthModel, path, *, files=()) -> Path:
    """Write `model` to the directory `path` atomically and return the path.

    files: extra files (e.g. the tokenizer.json and tokenizer_config.json of the model
    the weights came from) copied into the checkpoint and covered by its manifest.
    An existing depthjax checkpoint at `path` is replaced (other files in it are kept);
    any other existing file or non-empty directory is left alone and raises
    FileExistsError.
    """
    if isinstance(model, Stitched):
        return _save_stitched(model, Path(path), files)
    if not isinstance(model, DepthModel):
        raise TypeError(f"save expects a DepthModel, got {type(model).__name__}")
    if model.program.block.ndim != 1:
        raise CheckpointError(
            f"save takes a model with one program; got a batch of "
            f"programs {model.program.block.shape}"
        )
    path = Path(path)
    extra = _save_target(path, files, FILES)
    flat = flatten_params(model.params)
    old_files = set(FILES) | set(_listed_files(path))
    with atomic.replacing(path, carry=lambda name: name not in old_files) as tmp:
        _write_json(tmp / "config.json", model.config.to_dict())
        _write_json(tmp / "program.json", model.program.to_dict())
        # each leaf comes to the host as it is written: one leaf beyond the model at a
        # time; the file's digest is taken from the bytes written, not read back
        params_digest = integrity.PieceDigest()
        safetensors_io.write(
            tmp / "params.safetensors",
            [
                (k, v.shape, v.dtype, lambda v=v: np.asarray(jax.device_get(v)))
                for k, v in flat.items()
            ],
            hasher=params_digest,
        )
        for f in extra:
            shutil.copyfile(f, tmp / f.name)
        names = ["config.json", "program.json"] + [f.name for f in extra]
        digests = {
            "params.safetensors": params_digest.hexdigest(),
            **integrity.file_digests(tmp, names),
        }
        integrity.write_sealed(
            tmp / "manifest.json",
            {
                "format": FORMAT,
                "version": VERSION,
                "params": _describe(model.params),
                "files": digests,
                "piece_bytes": params_digest.piece_bytes,
            },
        )
    return path


def _listed_files(path: Path) -> list[str]:
    """The files an existing checkpoint's manifest lists (none if it cannot be read)."""
    try:
        return list(json.loads((path / "manifest.json").read_text()).get("files", {}))
    except (OSError, ValueError, AttributeError):
        return []


def _read(path: Path, name: str, digests: dict[str, str]) -> bytes:
    """The bytes of one file of the checkpoint, read once; checked against its SHA-256 when
    `digests` (the manifest's, under verify=True) lists it."""
    try:
        if name in digests:
            return integrity.read_checked(path, name, digests[name])
        return (path / name).read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is incomplete: {name} is missing") from None
    except integrity.IntegrityError as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: {e}") from None


def _json(raw: bytes, path: Path):
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt (not valid JSON: {e})") from None


def load(
    path, *, verify: bool = True, param_dtype: str | None = None, mesh=None
) -> DepthModel | Stitched:
    """Read a checkpoint written by `save`. Bit-exact; parameters land on the default device,
    or with mesh= (a `Mesh(data, fsdp, tensor)`) sharded by the rules table of
    depthjax.core.sharding, each leaf sent from the host shard by shard (`dj.shard`).
    A stitched model's directory gives a `Stitched` (module docstring).

    verify=True checks the SHA-256 of every file against the manifest; the manifest's own
    checksum is always checked. Each file is read once: the weights are read straight into
    their own arrays while their digest is computed, so peak host memory is the weights'
    bytes (plus one leaf when param_dtype casts).
    param_dtype: cast the floating parameters of embed/blocks/head (and any adapters) to
    this dtype ("float32", "bfloat16", "float16"); None keeps the dtype they were saved
    with, and the config's param_dtype says which.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"no checkpoint at {path}: {'not a directory' if path.exists() else 'does not exist'}"
        )
    raw = _read(path, "manifest.json", {})
    manifest = _json(raw, path / "manifest.json")
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found == STITCHED:
        if mesh is not None:
            raise CheckpointError(f"{path} is a stitched model, which load(mesh=) cannot shard")
        return _load_stitched(path, raw, verify, param_dtype)
    if found != FORMAT:
        raise CheckpointError(f"{path} is not a depthjax checkpoint (manifest format {found!r})")
    if manifest.get("version") not in range(1, VERSION + 1):
        raise CheckpointError(
            f"{path} has checkpoint version {manifest.get('version')}; "
            f"this depthjax reads versions 1..{VERSION}"
        )
    digests = {}  # of the files read below, checked as they are read
    try:
        if manifest["version"] >= 2:
            manifest = integrity.parse_sealed(raw, "manifest.json")
            _check_manifest(manifest, path)
            if verify:
                digests = manifest["files"]
                others = {k: v for k, v in digests.items() if k not in FILES}
                integrity.check_digests(path, others)  # tokenizer files, ...
    except integrity.IntegrityError as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: {e}") from None
    config_file = path / "config.json"
    try:
        config = ModelConfig.from_dict(_json(_read(path, "config.json", digests), config_file))
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{config_file} does not describe a model: {e}") from None
    params_file = path / "params.safetensors"
    flat = _read_params(params_file, manifest, digests, verify)
    params = _unflatten(manifest["params"], flat)
    if flat:
        raise CheckpointError(
            f"params.safetensors holds tensors not in the manifest: {sorted(flat)[:5]}"
        )
    check_params(config, params)
    stored = _float_dtype(params)
    if param_dtype is not None:
        config = config.replace(param_dtype=param_dtype)
        params = _cast_floats(params, jnp.dtype(param_dtype))
    elif stored is not None and stored != config.param_dtype:
        config = config.replace(param_dtype=stored)  # weights cast before saving
    # aligned host arrays: adopted without a copy, or sent to the mesh shard by shard
    where = None if mesh is None else sharding_lib.param_shardings(params, mesh)
    params = jax.device_put(params, where)
    n_blocks = rows_lib.count(params["blocks"])
    program_json = _json(_read(path, "program.json", digests), path / "program.json")
    program = Program.from_dict(program_json, n_blocks=n_blocks)
    return DepthModel(config, params, program)


def _save_target(path: Path, files, reserved) -> list[Path]:
    """Refuse to overwrite anything but a checkpoint or an empty directory at `path`;
    the extra `files` as paths, none of them named like the checkpoint's own."""
    if path.exists() and not (
        path.is_dir() and ((path / "manifest.json").exists() or not any(path.iterdir()))
    ):
        raise FileExistsError(
            f"{path} exists and is not a depthjax checkpoint; refusing to overwrite it"
        )
    extra = [Path(f) for f in files]
    for f in extra:
        if f.name in reserved or not f.is_file():
            raise CheckpointError(
                f"save(files=...): {f} is not a file that can go into a "
                f"checkpoint (names {tuple(reserved)} are reserved)"
            )
    return extra


def _save_stitched(model: Stitched, path: Path, files) -> Path:
    check_stitched(model)
    extra = _save_target(path, files, ("front", "back", "map.safetensors", "manifest.json"))
    with atomic.replacing(path) as tmp:
        save(model.front, tmp / "front")
        save(model.back, tmp / "back")
        stitch_map = {"W": np.asarray(model.W), "c": np.asarray(model.c)}
        safetensors_io.write(
            tmp / "map.safetensors",
            [(k, v.shape, v.dtype, lambda v=v: v) for k, v in stitch_map.items()],
        )
        for f in extra:
            shutil.copyfile(f, tmp / f.name)
        names = ["map.safetensors", "front/manifest.json", "back/manifest.json"]
        integrity.write_sealed(
            tmp / "manifest.json",
            {
                "format": STITCHED,
                "version": 1,
                "at": model.at,
                "resume": model.resume,
                "files": integrity.file_digests(tmp, names + [f.name for f in extra]),
            },
        )
    return path


def _load_stitched(path: Path, raw: bytes, verify: bool, param_dtype: str | None) -> Stitched:
    try:
        manifest = integrity.parse_sealed(raw, "manifest.json")
        digests = manifest.get("files")
        if not isinstance(digests, dict) or not all(
            isinstance(manifest.get(k), int) for k in ("at", "resume")
        ):
            raise CheckpointError(f"{path / 'manifest.json'} is not a complete stitched manifest")
        if verify:  # map.safetensors is checked as it is read below
            others = {k: v for k, v in digests.items() if k != "map.safetensors"}
            integrity.check_digests(path, others)
    except integrity.IntegrityError as e:
        raise CheckpointError(f"stitched checkpoint {path} is corrupt: {e}") from None
    front, back = (
        load(path / part, verify=verify, param_dtype=param_dtype) for part in ("front", "back")
    )
    if not (isinstance(front, DepthModel) and isinstance(back, DepthModel)):
        raise CheckpointError(f"{path}: the parts of a stitched model are single models")
    map_file = path / "map.safetensors"
    if not map_file.exists():
        raise CheckpointError(f"{path} is incomplete: map.safetensors is missing")
    hasher = hashlib.sha256() if verify and "map.safetensors" in digests else None
    try:
        tensors = safetensors_io.read_all(map_file, hasher)
    except (safetensors_io.SafetensorsError, OSError) as e:
        raise CheckpointError(f"{map_file} is corrupt: {e}") from None
    if hasher is not None and hasher.hexdigest() != digests["map.safetensors"]:
        raise CheckpointError(
            f"stitched checkpoint {path} is corrupt: "
            + integrity.MISMATCH.format("map.safetensors")
        )
    if set(tensors) != {"W", "c"}:
        raise CheckpointError(
            f"{path / 'map.safetensors'} must hold W and c, has {sorted(tensors)}"
        )
    model = Stitched(
        front,
        back,
        jnp.asarray(tensors["W"]),
        jnp.asarray(tensors["c"]),
        manifest["at"],
        manifest["resume"],
    )
    try:
        check_stitched(model)
    except DepthjaxError as e:
        raise CheckpointError(f"{path} does not hold a consistent stitched model: {e}") from None
    return model


def _read_params(file: Path, manifest: dict, digests: dict, verify: bool) -> dict:
    """{name: array} of params.safetensors, read once, checked against the manifest's
    digest as it is read when verify asks for it: piecewise SHA-256 (version 3), SHA-256
    (2) or CRC-32 (1)."""
    v1 = manifest["version"] == 1
    hasher = None
    if verify and v1:
        hasher = _Crc32()
    elif file.name in digests and manifest["version"] == 2:
        hasher = hashlib.sha256()
    elif file.name in digests:
        hasher = integrity.PieceDigest(manifest["piece_bytes"])
    if not file.exists():
        raise CheckpointError(f"{file.parent} is incomplete: {file.name} is missing")
    try:
        flat = safetensors_io.read_all(file, hasher)
    except (safetensors_io.SafetensorsError, OSError) as e:
        raise CheckpointError(f"{file} is corrupt: {e}") from None
    if v1 and hasher is not None and hasher.value != manifest["params_crc32"]:
        raise CheckpointError(
            f"{file} is corrupt: its CRC-32 does not match the "
            "manifest (truncated or modified after saving)"
        )
    if not v1 and hasher is not None and hasher.hexdigest() != digests[file.name]:
        raise CheckpointError(
            f"checkpoint {file.parent} is corrupt: " + integrity.MISMATCH.format(file.name)
        )
    return flat


class _Crc32:
    """zlib.crc32 behind hashlib's update()."""

    value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)


def _float_dtype(params: dict) -> str | None:
    """The one floating dtype of the embed/blocks/head leaves, if they share one."""
    found = {
        np.dtype(x.dtype).name
        for part in ("embed", "blocks", "head")
        for x in jax.tree.leaves(params[part])
        if jnp.issubdtype(x.dtype, jnp.floating)
    }
    return found.pop() if len(found) == 1 else None


def _cast_floats(params: dict, dtype) -> dict:
    """Floating leaves cast to `dtype` (integer leaves of quantized or expanded tables
    keep theirs), each into an aligned array so the device can adopt it."""

    def cast(x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
            return x
        out = safetensors_io.aligned_empty(x.shape, dtype)
        out[...] = x
        return out

    return jax.tree.map(cast, params)


def _check_manifest(manifest: dict, path: Path) -> None:
    """A sealed manifest whose digest is right may still lack what `save` writes."""
    wrong = [
        f"{key!r} ({'missing' if key not in manifest else type(manifest[key]).__name__})"
        for key in ("files", "params")
        if not isinstance(manifest.get(key), dict)
    ]
    if wrong:
        raise CheckpointError(
            f"{path / 'manifest.json'} is not a complete depthjax manifest: it needs the "
            f"mappings 'files' and 'params', got {', '.join(wrong)}"
        )
    piece = manifest.get("piece_bytes")
    if manifest["version"] >= 3 and not (type(piece) is int and piece > 0):
        raise CheckpointError(
            f"{path / 'manifest.json'} is not a complete depthjax manifest: version "
            f"{manifest['version']} needs 'piece_bytes' (a positive int), got {piece!r}"
        )


def check_params(config: ModelConfig, params: dict) -> None:
    """Raise CheckpointError unless embed/blocks/head have exactly the shapes `config` makes.

    The block table may have any number of rows (tied or grown models) and may be quantized
    (each quantized kernel checked for consistency, then as the float table it stands for);
    other top-level subtrees (e.g. adapters) are not checked here.
    """
    for part in ("embed", "blocks", "head"):
        if part not in params:
            raise CheckpointError(f"params lack the {part!r} subtree")
    rows = {x.shape[0] for x in rows_lib.leading(params["blocks"])}
    if len(rows) != 1:
        raise CheckpointError(f"block table leaves disagree on the number of rows: {sorted(rows)}")
    problems = rows_lib.problems(params["blocks"])
    if problems:
        raise CheckpointError("malformed stored block table: " + "; ".join(problems[:4]))
    params = {**params, "blocks": rows_lib.logical(params["blocks"])}
    # shapes do not depend on the rows' attention kinds
    cfg = config.replace(n_layers=rows.pop(), layer_types=None, sliding_window=None)
    expected = jax.eval_shape(lambda k: init(cfg, k).params, jax.random.key(0))
    # Shapes only: a model saved with parameters cast to bfloat16 is still consistent.
    flat_want = {
        k: v.split("[")[1]
        for k, v in _flat_specs(
            _describe({p: expected[p] for p in ("embed", "blocks", "head")})
        ).items()
    }
    flat_got = {
        k: v.split("[")[1]
        for k, v in _flat_specs(
            _describe({p: params[p] for p in ("embed", "blocks", "head")})
        ).items()
    }
    problems = [f"missing {k} [{v}" for k, v in flat_want.items() if k not in flat_got]
    problems += [f"unexpected {k} [{v}" for k, v in flat_got.items() if k not in flat_want]
    problems += [
        f"{k} has shape [{flat_got[k]}, config needs [{v}"
        for k, v in flat_want.items()
        if k in flat_got and flat_got[k] != v
    ]
    problems += [
        f"{k} has dtype {leaf.dtype}, not floating point"
        for part in ("embed", "blocks", "head")
        for k, leaf in _flat_specs(params[part], part + "/").items()
        if not jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]
    if problems:
        raise CheckpointError(
            "parameters do not match the config: "
            + "; ".join(problems[:8])
            + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else "")
        )


def _flat_specs(tree: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in tree.items():
        out.update(_flat_specs(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: v})
    return out
