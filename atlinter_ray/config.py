"""Configuration schemas: plain dataclasses, no Hydra import.

Hydra composes ``conf/`` against these schemas (registered explicitly by
:func:`atlinter_ray.cli.register_configs`); the library itself only ever sees a
:class:`Config` object, so the pipeline runs the same from Python, tests and jobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from atlinter_ray.dataset import CCF_25UM_SHAPE
from atlinter_ray.dtypes import DtypeScaling
from atlinter_ray.planning import EdgePolicy, Placement


@dataclass
class DataConfig:
    """Which gene datasets to reconstruct.

    ``genes`` names experiments under ``root`` (``<root>/<name>.npy`` + ``.json``);
    ``datasets`` lists full paths or URLs; ``manifest`` is a text file with one dataset
    path or URL per line (``#`` starts a comment). All three may be combined.
    """

    #: Folder or URL holding the experiments named in ``genes``.
    root: str | None = None
    #: Experiment ids: file names under ``root`` without ``.npy``.
    genes: list[str] = field(default_factory=list)
    #: Full paths or URLs of datasets' ``.npy`` files (each with its ``.json`` beside it).
    datasets: list[str] = field(default_factory=list)
    #: Text file with one dataset path or URL per line (``#`` starts a comment).
    manifest: str | None = None
    #: The reference volume (AP, DV, LR); default: the 25 µm CCF. A dataset's json may
    #: give its own ``reference_shape``.
    reference_shape: list[int] = field(default_factory=lambda: list(CCF_25UM_SHAPE))
    #: fsspec options for reading the inputs (and the reference volume), e.g. ``endpoint_url``.
    storage_options: dict[str, Any] = field(default_factory=dict)
    #: Optional ground truth per dataset id: ``.npz`` files holding ``volume``
    #: (reference orientation, channels last), to score the predicted slices.
    truth: dict[str, str] = field(default_factory=dict)
    #: Run the valid datasets and report the invalid ones as skipped, instead of
    #: refusing the job (which lists every invalid one).
    skip_invalid: bool = False


@dataclass
class OutputConfig:
    """Where and how the reconstructed volumes are written."""

    #: Folder or URL (``s3://``, ...) the volumes, pictures and summary are written to.
    root: str = "outputs/volumes"
    #: fsspec options for writing the output (e.g. ``endpoint_url`` of an S3-protocol server).
    storage_options: dict[str, Any] = field(default_factory=dict)
    #: Output dtype; default: the input's. A dtype that would clip the data's range or
    #: round float data to a few grey levels is refused, unless scaled (next setting).
    dtype: str | None = None
    #: ``none``: values are written as they are (rounded for integer dtypes).
    #: ``full_range``: where the output dtype is an integer, each dataset's full
    #: intensity range [0, peak] (json ``intensity_max``, else 1.0 for float images or
    #: the integer dtype's maximum) is mapped linearly onto [0, the dtype's maximum];
    #: the scale and offset are recorded in the image's ``atlinter_ray.run.intensity_scaling``.
    #: Part of the image's identity.
    dtype_scaling: DtypeScaling = DtypeScaling.none
    #: Replace an image made with other settings instead of refusing it.
    overwrite: bool = False
    #: Write the quick-look and montage pictures beside each image.
    quicklook: bool = True
    #: Zstandard level of the chunks (1..22; higher: smaller files, slower writes). 1
    #: writes a 320x456 RGB slice 2.7x (dense images) to 4.7x (sparse) faster than zstd's
    #: default 3, at 16 % (dense) or 2 % (sparse) more bytes. -1..-7 are Zstandard's
    #: faster modes: -3 compresses a full-size RGB gene in a third of level 1's CPU
    #: time, at 21 % more bytes (dense synthetic genes); every reader decodes any level.
    #: Part of the image's identity, like the layout settings below.
    zstd_level: int = 1
    #: Slices per stored object (a zarr shard) along the section axis at level 0; a task
    #: owns whole slabs of this many slices (atlinter_ray/layout.py). 16: 0.34 S3
    #: requests per slice (8: 0.59) and fewer model calls repeated at slab boundaries
    #: (bisection 8 %, flow 25 %; 8: 14 %, 38 %), for 16 slices held per task.
    slab: int = 16
    #: In-plane inner chunk ``[h, w]`` inside each shard (what a viewer fetches by byte
    #: range); None: the whole section plane.
    chunks: list[int] | None = field(default_factory=lambda: [32, 32])
    #: Removed (every object is now a shard ``slab`` slices deep): set, it is refused
    #: with a message naming ``output.slab``.
    shards: bool | None = None
    #: Pyramid levels (2x2x2 means) are added until the largest side is at most this;
    #: 0: no pyramid.
    pyramid_min: int = 64
    #: Seconds a driver watches an object-store lease nobody renews (its holder killed on
    #: another machine) before taking it over, on its own clock: no two hosts' clocks are
    #: compared; the holder renews it every third of this. A local lock is freed when
    #: its process ends.
    lease_ttl_s: float = 60.0


@dataclass
class ModelConfig:
    """The model: a registry name, an optional checkpoint, model-specific params."""

    #: Registry name of the model (set by the ``model=`` group).
    name: str = "dis"
    #: Weights file (or folder, for ``rife_hd``) of a learned model, a path or URL.
    checkpoint: str | None = None
    #: Settings passed to the model (``model.params.NAME``; new names with a leading ``+``).
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class FallbackConfig:
    """An arbitrary-t model for the positions a midpoint-only model cannot reach.

    With ``placement=exact``, a midpoint-only model (``rife_hd``, ``rife_v3``, ``cain``)
    still predicts every dyadic position (t = m/2^k) by bisection; the slices at other
    positions (t = 1/3, ...) come from this model. ``name`` None: no fallback.
    """

    #: Registry name of a model with any t (``dis``, ``rife_v4``, ``raft``, ...); null: none.
    name: str | None = None
    #: Weights file of the fallback model, when it is a learned one.
    checkpoint: str | None = None
    #: Settings passed to the fallback model.
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class InterpolationConfig:
    """Where predicted slices sit (``exact``/``atlinter``) and how edges are filled."""

    #: ``exact``: each slice at its true position; ``atlinter``: the predecessor's
    #: nearest-of-2^k bisection frame.
    placement: Placement = Placement.exact
    #: Model with any t for the slices a midpoint-only model cannot reach with ``exact``.
    exact_fallback: FallbackConfig = field(default_factory=FallbackConfig)
    #: ``copy``: slices outside the known sections repeat the nearest one (as the
    #: predecessor); ``empty``: left at 0; ``reference`` (with ``reference``): moved along
    #: the reference's flow from the nearest known section.
    edge: EdgePolicy = EdgePolicy.copy
    #: Reference volume ``.nrrd``, ``.npy`` or OME-Zarr (e.g. the Nissl; shape
    #: ``reference_shape``, or with a trailing 3 for RGB) for the reference-guided mode;
    #: read with data.storage_options. With ``model=fusion`` or ``curved`` it joins the gene's flows.
    reference: str | None = None


@dataclass
class ResourcesConfig:
    """Ray cluster and actor-pool settings."""

    #: Cluster address; None uses RAY_ADDRESS when set, else starts a local cluster.
    address: str | None = None
    #: The pool asks for one actor per queued batch, up to ``max_workers``; once the
    #: queue is empty, idle actors above ``min_workers`` are released early (their GPU
    #: nodes can then leave), the rest at the end of the run.
    min_workers: int = 1
    #: The most worker actors the pool grows to.
    max_workers: int = 2
    #: GPUs each worker actor asks Ray for (0: CPU workers).
    gpus_per_worker: float = 0.0
    #: CPUs each worker actor asks Ray for.
    cpus_per_worker: float = 1.0
    #: Seconds to wait for the first worker to be placed and started (GPU nodes of an
    #: autoscaling cluster take minutes) before the run gives up with the fix; None: wait.
    start_timeout_s: float | None = 900.0
    #: Slab tasks handed to a worker per call (tasks of one batch share a gap's work).
    tasks_per_batch: int = 1
    #: Seconds one task may run before its worker is ended and the task rerun, or the job
    #: stopped when the output store no longer answers; None: no limit. A call of
    #: ``tasks_per_batch`` tasks gets that many times this.
    task_timeout_s: float | None = 1800.0
    #: Seconds without a finished task after which a progress line is logged; also how
    #: long the output store may take to answer one small read after a task timed out
    #: (no answer: the job stops, naming the store) and to take ``run_summary.json``.
    heartbeat_s: float = 60.0
    #: The job stops early, with the cause, after this many storage failures in a row.
    max_storage_errors: int = 5
    #: Threads each worker's model may use (OpenCV, torch on CPU).
    threads_per_worker: int = 1
    #: Bytes of Ray's object store for a local cluster started by the job (None: Ray's default).
    object_store_memory: int | None = None
    #: CPUs of a local cluster started by the job (None: what the machine has).
    local_cpus: int | None = None
    #: GPUs of a local cluster started by the job (None: what the machine has).
    local_gpus: int | None = None


@dataclass
class RunConfig:
    """How the driver runs."""

    #: Run every task in this process without Ray (debugging, small data).
    serial: bool = False
    #: Show the progress bar.
    progress: bool = True
    #: Level of the job's log messages (``DEBUG``, ``INFO``, ``WARNING``, ...).
    log_level: str = "INFO"
    #: Print tracebacks of failures (secret values still removed); each worker also appends
    #: them to ``<temp dir>/atlinter_ray/tracebacks-<host>-<pid>.log``.
    debug: bool = False


@dataclass
class Config:
    """Everything one interpolation run needs."""

    data: DataConfig = field(default_factory=DataConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    interpolation: InterpolationConfig = field(default_factory=InterpolationConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    run: RunConfig = field(default_factory=RunConfig)
