"""The model repository: `DIR/<model>/<version>/`, one model format per version.

    DIR/
      shapes/
        config.toml            optional: version policy, batching, explanation
                               defaults, caps, preprocessing, labels (model_config)
        labels.txt             optional, named by config.toml's labels_file
        1/model.keras          a Keras 3 model
        2/model.h5             a legacy Keras (HDF5) model
        3/saved_model.pb       a TensorFlow SavedModel (with variables/ beside it)

A version is a directory named by a positive integer and holds exactly one of
`model.keras`, `model.h5` or `saved_model.pb`; anything else is a load error naming
what it holds. The version policy of the model's config.toml (by default the
highest version only, as TensorFlow Serving and Triton do) chooses which versions
are loaded; a request naming no version gets the highest loaded one.

Safety: a model name (of a directory or of a request) must match
`MODEL_NAME_PATTERN`, so it is one path component that is never `.` or `..` and
holds no separator, NUL or odd character; directories with other names are skipped
with a warning, and a request with one is refused before any lookup. Keras files
load in safe mode, so a model file cannot run Python code (a `Lambda` layer with
Python code is refused, in `.keras` and `.h5` alike); a SavedModel runs no Python
but may use any TensorFlow op (see `savedmodel`).

Hygiene: only regular files and directories are read. A FIFO, socket or device
anywhere in the repository is skipped with a warning (reading a FIFO would block
the poll, and with it hot reload and shutdown, for ever); a config.toml that is
one makes its model fail. A model directory, version directory or file that is a
link resolving outside the repository is refused the same way (config.toml: its
model fails; anything else is skipped with a warning), unless
`allow_links_outside_repository` is set: otherwise a link could make the server
read, and echo parts of, any file it can open. Links inside the repository (such
as Kubernetes' `..data` links of a mounted ConfigMap) are followed. Reasons sent
to clients name paths relative to the repository (`relative_paths`), never the
server's absolute paths.

Failures are contained: a model whose config.toml is bad, or a version whose files
cannot be loaded, is recorded with the reason (`ModelRepository.failures`, logs, and
the NOT_FOUND message of requests naming it) and the rest of the repository is
served. The policy chooses among the versions that load (`choose`): with `latest 1`
a broken version 3 leaves version 2 served, and reported.

Hot reload (`reload`) compares `snapshot`s of the files: every served runtime
remembers the `Key` (configuration stamp, version stamp) it was loaded from, every
failure the key it failed with, so a version is loaded again only when its files or
its model's configuration changed, and a broken one is not retried until they do.
`ModelRepository.serve` swaps the versions of one model at once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from salience_server.errors import InvalidArgument, NotFound, allowed
from salience_server.model_config import (
    CONFIG_FILE,
    ModelConfig,
    ModelConfigError,
    VersionPolicy,
    load_model_config,
    read_regular,
    special,
)
from salience_server.readiness import (
    FAILED,
    LOADING,
    READY,
    UNLOADING,
    VERSION_TRANSITIONS,
    VersionStatus,
    check,
    version_state,
)

if TYPE_CHECKING:
    # Loading a version needs TensorFlow; the registry itself does not (the device
    # seam's callers read it), so those imports wait for the first load.
    from salience_server.runtime import ModelRuntime

log = logging.getLogger(__name__)

KERAS_FILE = "model.keras"
H5_FILE = "model.h5"
SAVED_MODEL_FILE = "saved_model.pb"
MODEL_FILES = (KERAS_FILE, H5_FILE, SAVED_MODEL_FILE)
# Kept for callers that name the default format.
MODEL_FILE = KERAS_FILE

MODEL_NAME_PATTERN = "[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
VERSION_DIR = re.compile(r"[1-9][0-9]{0,17}")
# A failure's reason is cut to this many characters (Keras messages can be long).
MAX_REASON = 600
# Configuration files up to this size are stamped by their content (a rewrite within
# the file system's mtime granularity is still seen); larger ones by size and mtime.
HASHED_FILE_BYTES = 1024 * 1024

Stamp = tuple[tuple[str, int, str], ...]
"""Files with their sizes and contents (or modification times), sorted by path."""

Key = tuple[Stamp, Stamp]
"""What a runtime was loaded from: its model's configuration stamp and its version's."""


class RepositoryError(RuntimeError):
    """The repository holds nothing that can be served."""


class ModelLoadError(ValueError):
    """A model version that cannot be loaded; the message names its files."""


def valid_model_name(name: str) -> bool:
    """Whether `name` may name a model: one safe path component."""
    return MODEL_NAME.fullmatch(name) is not None


def check_model_name(name: str) -> None:
    """InvalidArgument for a request's model name that could not name a model."""
    if not valid_model_name(name):
        raise InvalidArgument(
            f"model.name={name!r} is not a valid model name: use 1 to 128 letters, digits, "
            f"'.', '_' or '-', starting with a letter or digit ({MODEL_NAME_PATTERN})"
        )


# Finding models on disk -------------------------------------------------------


@dataclass(frozen=True)
class ModelFiles:
    """One model directory's files, cheaply: what hot reload compares between polls.

    `refused` names the model's own files (outside its versions) that are not read:
    not regular files, or links leading outside the repository; a config.toml
    among them makes the model fail.
    """

    name: str
    path: Path
    config: Stamp  # every file of the model directory outside its versions
    versions: Mapping[int, Stamp]
    refused: Mapping[str, str] = field(default_factory=dict)  # name: why

    def key(self, version: int) -> Key:
        return (self.config, self.versions[version])


@dataclass(frozen=True)
class ModelSource:
    """One model directory as found on disk.

    `config` is None when config.toml is unusable (`error` says why); `versions` are
    every version directory present, `selected` those the version policy serves
    (before any fails to load: see `choose`); `files` their stamps, taken before the
    configuration was read.
    """

    name: str
    path: Path
    config: ModelConfig | None
    error: str
    versions: dict[int, Path]
    selected: tuple[int, ...]
    files: ModelFiles | None = field(default=None, compare=False)


def _entries(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir())


def _skip(path: Path, why: str, warn: bool = True) -> None:
    # Hidden entries (.git, editor and notebook folders) are expected; others are news
    # (once: the watcher's polls pass warn=False).
    level = logging.DEBUG if path.name.startswith(".") or not warn else logging.WARNING
    log.log(level, "skipping %s: %s", path, why)


# Paths already warned about as unsafe (a FIFO, a link outside): each is news once,
# not on every poll; bounded, so a repository churning such names cannot grow it.
_WARNED: set[tuple[str, str]] = set()
MAX_WARNED = 4096


def _refuse(path: Path, why: str) -> None:
    key = (str(path), why)
    if key in _WARNED:
        return
    if len(_WARNED) >= MAX_WARNED:
        _WARNED.clear()
    _WARNED.add(key)
    log.warning("skipping %s: %s", path, why)


OUTSIDE_LINK = (
    "a link leading outside the model repository (set allow_links_outside_repository to follow it)"
)
UNRESOLVED_LINK = "a link that cannot be resolved"
LINKS = (OUTSIDE_LINK, UNRESOLVED_LINK)


@dataclass(frozen=True)
class Bounds:
    """What the repository may contain: its resolved root, and whether links that
    resolve outside it are followed (`allow_links_outside_repository`).
    """

    root: Path
    allow_outside: bool = False

    @classmethod
    def of(cls, root: Path, allow_outside: bool = False) -> Bounds:
        return cls(root.resolve(), allow_outside)

    def outside(self, path: Path) -> str:
        """Why `path` may not be read (a link leading outside), or "" when it may."""
        # Each entry is checked as it is walked, so only the entry itself is a link to
        # look at (a directory above it was checked on the way down).
        if self.allow_outside or not path.is_symlink():
            return ""
        try:
            target = path.resolve()
        except (OSError, RuntimeError):  # a link loop
            return UNRESOLVED_LINK
        return "" if target.is_relative_to(self.root) else OUTSIDE_LINK


def version_dirs(
    model_dir: Path, warn: bool = True, bounds: Bounds | None = None
) -> dict[int, Path]:
    """The version directories of a model, by version; others are skipped with a
    warning, as are links leading outside the repository (with `bounds`).
    """
    found: dict[int, Path] = {}
    for version_dir in _entries(model_dir):
        if not VERSION_DIR.fullmatch(version_dir.name):
            _skip(version_dir, "a version directory is named by a positive integer", warn)
            continue
        why = bounds.outside(version_dir) if bounds is not None else ""
        if why:
            _refuse(version_dir, why)
            continue
        found[int(version_dir.name)] = version_dir
    return found


def _file_entry(
    path: Path, name: str, hashed: bool, refused: dict[str, str], bounds: Bounds | None
) -> tuple[str, int, str] | None:
    why = bounds.outside(path) if bounds is not None else ""
    try:
        status = path.stat()
        why = why or special(status.st_mode)
        if why:
            refused[name] = why
            _refuse(path, why)
            return None
        if hashed and status.st_size <= HASHED_FILE_BYTES:
            return (name, status.st_size, hashlib.sha256(read_regular(path)).hexdigest())
    except OSError:
        return None  # removed while we looked: the next poll sees the change
    # The inode too: a file replaced by a copy that kept size and mtime (cp -p) is new.
    return (name, status.st_size, f"mtime:{status.st_mtime_ns}:{status.st_ino}")


def _stamp(
    top: Path,
    skip: Callable[[str], bool],
    hashed: bool,
    bounds: Bounds | None = None,
    refused: dict[str, str] | None = None,
) -> Stamp:
    """The stamp of the files under `top`; those that may not be read are left out
    and named in `refused` (relative to `top`), with why.
    """
    refused = {} if refused is None else refused
    entries = []
    for directory, subdirs, files in os.walk(top):
        here = Path(directory)
        if here == top:
            subdirs[:] = [d for d in subdirs if not skip(d)]
        # Hidden clutter (.git, editor swap files) never triggers a reload.
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        if bounds is not None:
            # Not walked (os.walk follows no link), but a loader would follow one.
            for name in subdirs:
                why = bounds.outside(here / name)
                if why:
                    refused[str((here / name).relative_to(top))] = why
                    _refuse(here / name, why)
        for name in files:
            if name.startswith("."):
                continue
            # Only files at the top are hashed: a model directory may hold a folder of
            # many small files (samples, docs) that must not be read on every poll.
            path = here / name
            entry = _file_entry(
                path, str(path.relative_to(top)), hashed and here == top, refused, bounds
            )
            if entry is not None:
                entries.append(entry)
    return tuple(sorted(entries))


def version_stamp(
    version_dir: Path, bounds: Bounds | None = None, refused: dict[str, str] | None = None
) -> Stamp:
    """Every file of a version directory (SavedModel variables included) with its
    size and modification time: what changes when the version's files are replaced.
    """
    return _stamp(version_dir, lambda name: False, False, bounds, refused)


def config_stamp(
    model_dir: Path, bounds: Bounds | None = None, refused: dict[str, str] | None = None
) -> Stamp:
    """Every file of a model directory outside its version directories (config.toml,
    a labels file); small ones at its top by content, the others by size and mtime.
    """
    return _stamp(
        model_dir, lambda name: VERSION_DIR.fullmatch(name) is not None, True, bounds, refused
    )


def snapshot(
    root: Path, warn: bool = False, allow_links_outside: bool = False
) -> dict[str, ModelFiles]:
    """The stamps of every model directory under root (nothing is parsed or loaded).

    Only regular files and directories are stamped; with `allow_links_outside`
    False, links that resolve outside root are not followed either (see the
    module doc). A version directory holding such a link is skipped with a
    warning (its loader would follow the link); a FIFO, socket or device in it
    is only left out of its stamp.

    Raises OSError when root itself cannot be listed; a model directory that
    vanishes while it is read is left out, as if it were gone.
    """
    bounds = Bounds.of(root, allow_links_outside)
    found: dict[str, ModelFiles] = {}
    for model_dir in _entries(root):
        if not valid_model_name(model_dir.name):
            _skip(model_dir, f"a model name must match {MODEL_NAME_PATTERN}", warn)
            continue
        why = bounds.outside(model_dir)
        if why:
            _refuse(model_dir, why)
            continue
        refused: dict[str, str] = {}
        try:
            # The configuration first: a change that lands while the versions are
            # stamped then shows as a change on the next poll, never as none.
            config = config_stamp(model_dir, bounds, refused)
            dirs = version_dirs(model_dir, warn, bounds)
        except OSError:
            continue
        versions = {}
        for version, path in dirs.items():
            unsafe: dict[str, str] = {}
            stamp = version_stamp(path, bounds, unsafe)
            links = sorted(name for name, why in unsafe.items() if why in LINKS)
            if links:
                _refuse(path, f"it holds {allowed(links)}, {OUTSIDE_LINK}")
                continue
            versions[version] = stamp
        found[model_dir.name] = ModelFiles(model_dir.name, model_dir, config, versions, refused)
    return found


def read_source(files: ModelFiles, warn: bool = True) -> ModelSource:
    """A model's configuration and selected versions, for its stamped files."""
    versions = {version: files.path / str(version) for version in files.versions}
    try:
        if CONFIG_FILE in files.refused:
            raise ModelConfigError(f"{CONFIG_FILE} is {files.refused[CONFIG_FILE]}: it is not read")
        config: ModelConfig | None = load_model_config(files.path)
        error = ""
    except ModelConfigError as err:
        config, error = None, str(err)
    selected: tuple[int, ...] = ()
    if config is not None:
        selected = config.version_policy.select(versions)
        missing = sorted(set(config.version_policy.versions) - set(versions))
        if missing and warn:
            log.warning(
                "model %s: version_policy lists %s, not present in %s",
                files.name,
                ", ".join(map(str, missing)),
                files.path,
            )
    return ModelSource(files.name, files.path, config, error, versions, selected, files)


def scan(root: Path, allow_links_outside: bool = False) -> dict[str, ModelSource]:
    """Every model directory under root with its configuration and versions.

    Directories whose name is not a valid model name are skipped with a warning;
    a bad config.toml is reported in the source's `error`, never raised.
    """
    found = snapshot(root, warn=True, allow_links_outside=allow_links_outside)
    return {name: read_source(files) for name, files in found.items()}


def relative_paths(text: str, root: Path | None) -> str:
    """`text` with the repository's absolute path taken out of the paths it names:
    what clients are told names paths relative to the repository, never where the
    server keeps it.
    """
    if root is None:
        return text
    for prefix in sorted({str(root), str(root.resolve())}, key=len, reverse=True):
        if prefix in ("", "/"):
            continue
        text = text.replace(prefix + os.sep, "").replace(prefix, ".")
    return text


def choose(
    policy: VersionPolicy,
    on_disk: Iterable[int],
    broken: Collection[int] = (),
    kept: Collection[int] = (),
) -> tuple[int, ...]:
    """The versions to serve: the policy applied to the versions that can be served.

    Those are the versions on disk less the `broken` ones (whose files failed to
    load), except broken ones in `kept` (served from files loaded before, which a
    broken rewrite never replaces). So with `latest 1`, a broken version 3 leaves
    version 2 served.
    """
    return policy.select(v for v in on_disk if v not in broken or v in kept)


def no_version_reason(source: ModelSource) -> str:
    """Why a model with a usable configuration has no version to serve."""
    assert source.config is not None  # a bad configuration is its own reason
    if not source.versions:
        return (
            f"no version to serve: {source.path} holds no version directory (a positive "
            "integer, such as 1/)"
        )
    return (
        f"no version to serve: {source.path} holds versions "
        f"{allowed(sorted(source.versions))}, none selected by version_policy "
        f"{source.config.version_policy.describe()}"
    )


def model_format(version_dir: Path) -> Path:
    """The one model file (or SavedModel `saved_model.pb`) of a version directory.

    Raises ModelLoadError naming what the directory holds when it has none or
    several of `MODEL_FILES`.
    """
    present = [name for name in MODEL_FILES if (version_dir / name).is_file()]
    if len(present) == 1:
        return version_dir / present[0]
    if present:
        raise ModelLoadError(
            f"{version_dir} holds {allowed(present)}: keep exactly one model format per "
            "version directory"
        )
    held = sorted(p.name for p in version_dir.iterdir())
    raise ModelLoadError(
        f"{version_dir} holds no model: expected one of {allowed(MODEL_FILES)}, found "
        f"{allowed(held) if held else 'nothing'}"
    )


def check_config(runtime: ModelRuntime) -> None:
    """What a model's configuration says about the model itself, checked against it:
    labels, explanation defaults. Raises ModelConfigError naming the key.
    """
    from salience_server.explain import modifiers

    config = runtime.config
    if config.labels:
        names = [info.name for info in runtime.outputs]
        if config.labels_output and config.labels_output not in names:
            raise ModelConfigError(
                f"config.toml: labels_output={config.labels_output!r} is not an output of the "
                f"model: choose one of {allowed(names)}"
            )
        info = runtime.outputs[names.index(config.labels_output) if config.labels_output else 0]
        units = info.shape[-1] if len(info.shape) >= 2 else None
        if units is not None and units != len(config.labels):
            raise ModelConfigError(
                f"config.toml: labels has {len(config.labels)} entries but output {info.name!r} "
                f"has {units} units: give one label per unit"
            )
        if units is None:
            raise ModelConfigError(
                f"config.toml: labels name the units of output {info.name!r}, whose shape "
                f"{list(info.shape)} has no known last axis"
            )
    defaults = config.explain
    supported = runtime.supported_methods()
    if defaults.method is not None and defaults.method not in supported:
        raise ModelConfigError(
            f"config.toml: explain.method={defaults.method!r} cannot explain this model: use "
            f"one of {allowed(supported)}"
        )
    for k, name in enumerate(defaults.grad_modifiers or ()):
        if name not in modifiers.GRAD_MODIFIERS:
            raise ModelConfigError(
                f"config.toml: explain.grad_modifiers[{k}]={name!r} is unknown: use one of "
                f"{allowed(modifiers.GRAD_MODIFIERS)}"
            )


def load_version(name: str, version: int, version_dir: Path, config: ModelConfig) -> ModelRuntime:
    """Loads one version directory (blocking TensorFlow work) with its model's config.

    Keras files load in safe mode. Raises ModelLoadError, ModelConfigError, or
    whatever the model file's loader raised.
    """
    import keras

    from salience_server.runtime import ModelRuntime
    from salience_server.savedmodel import ModelFormatError, SavedModelRuntime

    path = model_format(version_dir)
    if path.name == SAVED_MODEL_FILE:
        try:
            runtime: ModelRuntime = SavedModelRuntime.load_dir(name, version, version_dir, config)
        except ModelFormatError as err:
            raise ModelLoadError(f"{version_dir}: {err}") from None
    else:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
        runtime = ModelRuntime(name, version, model, path, config)
    check_config(runtime)
    return runtime


Loader = Callable[[str, int, Path, ModelConfig], "ModelRuntime"]


@dataclass(frozen=True)
class LoadFailure:
    """A model (version None: its configuration) or version that could not be loaded."""

    model: str
    version: int | None
    reason: str


def failure_reason(err: Exception) -> str:
    """A load error as one line for logs, metadata and NOT_FOUND messages."""
    known = isinstance(err, ModelLoadError | ModelConfigError)
    text = str(err) if known else f"{type(err).__name__}: {err}"
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 1] + "…"


class ModelRepository:
    """Loaded models by name and version, and what failed to load.

    Read and changed on the server's event loop only, so a swap (`serve`) is atomic
    for requests: each sees a model's versions from before it or after it.
    """

    def __init__(
        self,
        models: dict[str, dict[int, ModelRuntime]],
        failures: Sequence[LoadFailure] = (),
    ) -> None:
        self._models = models
        self._failures = tuple(failures)
        # What each served runtime was loaded from, and what each failure failed
        # with (version None: the configuration, keyed by its stamp alone).
        self._keys: dict[tuple[str, int], Key] = {}
        self._failed_keys: dict[tuple[str, int | None], Key] = {}
        self._loading: set[tuple[str, int]] = set()
        self._unloading: list[ModelRuntime] = []
        # Where the models come from: the reasons clients see name paths relative to it.
        self.root: Path | None = None

    @classmethod
    def load(
        cls,
        root: Path,
        loader: Loader = load_version,
        warm_up: bool = True,
        allow_links_outside: bool = False,
    ) -> ModelRepository:
        """Loads (and warms up) the versions every model's policy selects; blocking.

        A bad config.toml or a broken version is recorded and logged, and the rest
        is loaded (with `latest N`, a broken version gives way to the next one down);
        RepositoryError when nothing at all can be served.
        """
        sources = scan(root, allow_links_outside)
        if not sources:
            raise RepositoryError(
                f"no model found under {root}: expected {root}/<model>/<version>/ holding one "
                f"of {', '.join(MODEL_FILES)}"
            )
        repository = cls({})
        repository.root = root
        for source in sources.values():
            repository._load_model(source, loader, warm_up)
        if not repository._models:
            raise RepositoryError(
                f"no model under {root} could be loaded: "
                + "; ".join(
                    f"{f.model}" + (f" version {f.version}" if f.version else "") + f": {f.reason}"
                    for f in repository.failures
                )
            )
        return repository

    def _load_model(self, source: ModelSource, loader: Loader, warm_up: bool) -> None:
        name, files = source.name, source.files
        assert files is not None  # scan stamps every source
        if source.config is None:
            self.report(name, None, source.error, (files.config, ()))
            return
        broken: set[int] = set()
        loaded: dict[int, ModelRuntime] = {}
        while True:
            chosen = choose(source.config.version_policy, source.versions, broken)
            todo = [v for v in chosen if v not in loaded]
            if not todo:
                break
            for version in todo:
                version_dir = source.versions[version]
                log.info("loading model %s version %d from %s", name, version, version_dir)
                try:
                    runtime = loader(name, version, version_dir, source.config)
                    if warm_up:
                        runtime.warm_up()
                except Exception as err:
                    broken.add(version)
                    self.report(name, version, failure_reason(err), files.key(version), err)
                    continue
                loaded[version] = runtime
        if not chosen and not broken:
            self.report(name, None, no_version_reason(source), (files.config, ()))
        self.serve(name, {v: loaded[v] for v in chosen}, {v: files.key(v) for v in chosen})

    # Reading ------------------------------------------------------------------

    @property
    def failures(self) -> tuple[LoadFailure, ...]:
        """What could not be loaded, with the reasons."""
        return self._failures

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[int]:
        return sorted(self._models[name]) if name in self._models else []

    def runtimes(self, name: str) -> dict[int, ModelRuntime]:
        """The served runtimes of a model, by version (a copy)."""
        return dict(self._models.get(name, {}))

    def loaded_keys(self, name: str) -> dict[int, Key]:
        """What each served version of a model was loaded from."""
        return {
            v: self._keys[(name, v)] for v in self._models.get(name, {}) if (name, v) in self._keys
        }

    def failed_keys(self, name: str) -> dict[int | None, Key]:
        """What each failure of a model failed with (None: its configuration)."""
        return {v: key for (n, v), key in self._failed_keys.items() if n == name}

    def known(self) -> set[str]:
        """Every model served or failed."""
        return set(self._models) | {f.model for f in self._failures}

    def knows(self, name: str) -> bool:
        """Whether `name` is served or failed, without building `known()`."""
        return name in self._models or any(f.model == name for f in self._failures)

    def _failure(self, name: str, version: int | None) -> LoadFailure | None:
        return next((f for f in self._failures if f.model == name and f.version == version), None)

    def statuses(self, name: str) -> list[VersionStatus]:
        """Every version of a model the server knows of, ascending, with its state;
        first a version 0 entry when the model's configuration failed.

        A served version whose files were since replaced by ones that fail to load
        is `ready` (its earlier files are served) with the reason.
        """
        served = self._models.get(name, {})
        failed = {f.version: f.reason for f in self._failures if f.model == name}
        loading = {v for n, v in self._loading if n == name}
        unloading = {r.version for r in self._unloading if r.name == name}
        found = []
        if None in failed:
            found.append(VersionStatus(0, FAILED, failed[None]))
        numbered = {v for v in failed if v is not None}
        for version in sorted(set(served) | numbered | loading | unloading):
            reason = failed.get(version, "")
            state = version_state(version in served, version in loading, version in unloading)
            if state == READY and reason:
                reason = f"its files on disk fail to load, the earlier ones are served: {reason}"
            elif state != FAILED:
                reason = ""
            found.append(VersionStatus(version, state, reason))
        return found

    def get(self, name: str, version: int = 0) -> ModelRuntime:
        """The runtime for a model version (0 = highest).

        INVALID_ARGUMENT for a name that could not name a model or a negative
        version; NOT_FOUND names what is served (and why a failed one is not).
        """
        check_model_name(name)
        if version < 0:
            raise InvalidArgument(
                f"model.version={version} is not allowed: use a positive version, or 0 for "
                "the highest"
            )
        versions = self._models.get(name)
        if versions is None:
            failed = self._failure(name, None) or next(
                (f for f in self._failures if f.model == name), None
            )
            why = f" (it failed to load: {failed.reason})" if failed is not None else ""
            raise NotFound(
                f"model.name={name!r} is not served{why}: choose one of {allowed(self.names())}"
            )
        if version == 0:
            return versions[max(versions)]
        if version not in versions:
            failed = self._failure(name, version)
            why = f" (it failed to load: {failed.reason})" if failed is not None else ""
            raise NotFound(
                f"model.version={version} of model {name!r} is not served{why}: "
                f"choose one of {allowed(sorted(versions))} (or 0 for the highest)"
            )
        return versions[version]

    # Changing (hot reload) ------------------------------------------------------

    def serve(
        self, name: str, runtimes: Mapping[int, ModelRuntime], keys: Mapping[int, Key]
    ) -> list[ModelRuntime]:
        """Serves exactly `runtimes` for a model from now on (none: the model is
        dropped), in one step; returns the runtimes no longer served.

        `keys` says what each new runtime was loaded from. A new dict replaces the
        model's, so whoever resolved a runtime before keeps it.
        """
        before = self._models.get(name, {})
        if runtimes:
            self._models[name] = dict(runtimes)
        else:
            self._models.pop(name, None)
        for version, runtime in before.items():
            if runtimes.get(version) is not runtime:
                self._keys.pop((name, version), None)
        for version in runtimes:
            if version in keys:
                self._keys[(name, version)] = keys[version]
        return [r for v, r in before.items() if runtimes.get(v) is not r]

    def report(
        self,
        name: str,
        version: int | None,
        reason: str,
        key: Key,
        error: Exception | None = None,
    ) -> None:
        """Records (and logs, unless it was known) that a model's configuration
        (version None) or a version failed to load from `key`. The reason names
        paths relative to the repository (it is sent to clients).
        """
        reason = relative_paths(reason, self.root)
        known = self._failure(name, version)
        self._failed_keys[(name, version)] = key
        if known is not None and known.reason == reason:
            return
        kept = [f for f in self._failures if not (f.model == name and f.version == version)]
        self._failures = (*kept, LoadFailure(name, version, reason))
        if version is None:
            log.error("model %s cannot be served: %s", name, reason)
        else:
            expected = error is None or isinstance(error, ModelLoadError | ModelConfigError)
            log.error(
                "model %s version %d failed to load: %s",
                name,
                version,
                reason,
                exc_info=None if expected else error,
            )

    def forget(self, name: str, versions: Iterable[int | None] | None = None) -> None:
        """Drops the failures of some versions of a model (None: all of them)."""
        drop = None if versions is None else set(versions)
        self._failures = tuple(
            f
            for f in self._failures
            if not (f.model == name and (drop is None or f.version in drop))
        )
        for key in [k for k in self._failed_keys if k[0] == name]:
            if drop is None or key[1] in drop:
                del self._failed_keys[key]

    def mark_loading(self, name: str, version: int, loading: bool) -> None:
        """Whether a version is being loaded now (metadata shows it)."""
        key = (name, version)
        before = LOADING if key in self._loading else None
        check(
            VERSION_TRANSITIONS,
            f"model {name!r} version {version}",
            before,
            LOADING if loading else None,
        )
        if loading:
            self._loading.add(key)
        else:
            self._loading.discard(key)

    def mark_unloading(self, runtime: ModelRuntime, unloading: bool) -> None:
        """Whether a runtime no longer served is finishing its in-flight requests."""
        before = UNLOADING if any(r is runtime for r in self._unloading) else None
        what = f"model {runtime.name!r} version {runtime.version}"
        check(VERSION_TRANSITIONS, what, before, UNLOADING if unloading else None)
        if unloading:
            self._unloading.append(runtime)
        else:
            self._unloading = [r for r in self._unloading if r is not runtime]

    def close(self) -> None:
        """Drops every model, so its weights can be freed."""
        self._models.clear()
        self._unloading.clear()
