"""Typed, validated run configs: the single source of truth for every default.

A config is a YAML file plus dotted ``--set key.path=value`` overrides. Unknown or mistyped keys
are rejected with the key's full path before any Ray work starts.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from ray_lt.errors import ConfigError, DataError, read_utf8

DIGITS_PER_CLASS_MIN = 174  # the rarest digit in scikit-learn's bundled set has 174 images
# The feedback criteria (ray_lt.generate.criteria.CRITERIA); the group ones need a data set
# with class x context groups.
GROUP_CRITERION_NAMES = ("target_group", "group_entropy")
CRITERION_NAMES = ("entropy", "loss", "hardness", "total_uncertainty",
                   *GROUP_CRITERION_NAMES)
GROUPED_KINDS = ("digits_groups", "nico_pp")


@dataclass(frozen=True)
class Pool:
    """A Ray Data actor pool as a config section sets it: ``size`` actors (growing from
    ``min_size`` when that is set, started with ``initial_size``), each with ``cpus`` and
    ``gpus``, fed ``batch_size`` rows at a time. The evaluation, synthesis, writer and
    statistics pools are all given as one."""

    size: int
    cpus: float
    gpus: float
    batch_size: int
    min_size: int | None = None
    initial_size: int | None = None

    def demand(self) -> list[dict[str, float]]:
        """One resource bundle per actor, as the autoscaler is asked for them."""
        return [{"CPU": self.cpus, "GPU": self.gpus}] * self.size

    @property
    def use_gpu(self) -> bool:
        return self.gpus > 0

    def map_batches_args(self) -> dict[str, Any]:
        """The keyword arguments of ``Dataset.map_batches`` that place this pool."""
        import ray.data  # config stays importable where Ray is not installed

        if self.min_size is None:
            compute = ray.data.ActorPoolStrategy(size=self.size)
        else:
            compute = ray.data.ActorPoolStrategy(
                min_size=self.min_size, max_size=self.size,
                initial_size=self.initial_size or self.min_size)
        return {"compute": compute, "batch_size": self.batch_size, "num_cpus": self.cpus,
                "num_gpus": self.gpus}


class Strict(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are re-validated,
    and a float must be finite (inf and nan are refused, whatever its bounds)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              use_attribute_docstrings=True)


class DigitsLTData(Strict):
    """scikit-learn's handwritten digits made long-tailed: n_c = max_per_class * IF^(-c/(C-1))."""

    kind: Literal["digits_lt"]
    """Selects this data set: the long-tailed handwritten digits, built in memory."""
    num_classes: Literal[10] = 10
    """The ten digits; fixed."""
    image_size: int = Field(16, ge=8, le=64)
    """Side in pixels of the square images; the 8x8 digits are upsampled bilinearly."""
    channels: Literal[1, 3] = 1
    """1 for grey images, 3 for RGB (white on black either way); the pretrained generators
    need 3."""
    imbalance_factor: float = Field(50.0, ge=1.0)
    """IF: the ratio of the largest class's training images to the smallest's (class 0 is
    the head, class 9 the tail)."""
    max_per_class: int = Field(100, ge=1)
    """Training images of the largest class (class 0); the others follow
    ``max_per_class * IF^(-c/9)``, at least one each."""
    val_per_class: int = Field(20, ge=1)
    """Validation images per class (the validation split is balanced).
    ``max_per_class + val_per_class + test_per_class`` must not exceed 174."""
    test_per_class: int = Field(50, ge=1)
    """Test images per class (the test split is balanced)."""

    @model_validator(mode="after")
    def _fits_in_digits(self) -> DigitsLTData:
        need = self.max_per_class + self.val_per_class + self.test_per_class
        if need > DIGITS_PER_CLASS_MIN:
            raise ValueError(
                f"max_per_class + val_per_class + test_per_class = {need}, but the rarest digit "
                f"has only {DIGITS_PER_CLASS_MIN} images"
            )
        return self


class DigitsGroupsData(Strict):
    """Digits drawn on coloured backgrounds (contexts): each class has a majority context and
    some class x context groups are empty in training, as in NICO++; val/test groups balanced."""

    kind: Literal["digits_groups"]
    """Selects this data set: the digits on coloured backgrounds, built in memory."""
    num_classes: Literal[10] = 10
    """The ten digits; fixed."""
    image_size: int = Field(16, ge=8, le=64)
    """Side in pixels of the square images; the 8x8 digits are upsampled bilinearly."""
    channels: Literal[3] = 3
    """Always 3: the backgrounds are coloured (RGB)."""
    context_names: list[str] = Field(default_factory=lambda: ["red", "green", "blue", "yellow"])
    """The contexts: background colours, any matplotlib colour name, at least two. Class c's
    majority context is ``c % len(context_names)``; ``group = label * contexts + context``."""
    train_per_class: int = Field(100, ge=1)
    """Training images per class (classes are balanced; the groups are not)."""
    majority_fraction: float = Field(0.85, gt=0.0, le=1.0)
    """Share of a class's training images drawn in its majority context; the rest are shared
    evenly by its other non-empty contexts."""
    empty_groups_per_class: int = Field(1, ge=0)
    """Contexts per class (chosen by the seed among those other than its majority one) with no
    training image: the unseen groups; at most the number of contexts minus one."""
    val_per_group: int = Field(5, ge=1)
    """Validation images per class x context group (the validation split is balanced)."""
    test_per_group: int = Field(10, ge=1)
    """Test images per class x context group. ``train_per_class + (val_per_group +
    test_per_group) * contexts`` must not exceed 174."""

    @model_validator(mode="after")
    def _consistent(self) -> DigitsGroupsData:
        n_ctx = len(self.context_names)
        if n_ctx < 2:
            raise ValueError("context_names needs at least two contexts")
        if self.empty_groups_per_class > n_ctx - 1:
            raise ValueError(
                f"empty_groups_per_class={self.empty_groups_per_class} leaves no training context"
                f" for a class with {n_ctx} contexts"
            )
        need = self.train_per_class + (self.val_per_group + self.test_per_group) * n_ctx
        if need > DIGITS_PER_CLASS_MIN:
            raise ValueError(
                f"train_per_class + (val_per_group + test_per_group) * contexts = {need}, but the "
                f"rarest digit has only {DIGITS_PER_CLASS_MIN} images"
            )
        return self


class ListFileData(Strict):
    """ImageNet-LT / Places-LT: a root folder and split files of ``relative/path label`` lines."""

    kind: Literal["imagenet_lt", "places_lt"]
    """Selects this layout; it also names the default split files (``ImageNet_LT_*.txt`` or
    ``Places_LT_*.txt``)."""
    root: Path
    """The data folder: the split files and the image paths they list are relative to it."""
    num_classes: int = Field(ge=2)
    """Number of classes; every label must lie in ``[0, num_classes)`` (ImageNet-LT: 1000,
    Places-LT: 365)."""
    train_list: str | None = None
    """The training split file in ``root``; null: ``ImageNet_LT_train.txt`` or
    ``Places_LT_train.txt``."""
    val_list: str | None = None
    """The validation split file in ``root``; null: ``ImageNet_LT_val.txt`` or
    ``Places_LT_val.txt``."""
    test_list: str | None = None
    """The test split file in ``root``; null: ``ImageNet_LT_test.txt`` or
    ``Places_LT_test.txt``."""
    class_names_file: Path | None = None
    """A UTF-8 text file with one class name per line, in label order (a path of its own, not
    inside ``root``); the prompts use the names. Null: ``class 0``, ``class 1``, ..."""
    image_size: int = Field(224, ge=8)
    """Side in pixels that images are read at: shorter side resized to it, then centre-cropped
    to a square."""
    channels: Literal[3] = 3
    """Always 3: images are read as RGB, whatever their mode."""
    verify_images: bool = True
    """Decode every listed image once on Ray before anything trains, naming each file that
    fails with its list file and line."""

    def list_name(self, split: str) -> str:
        """The split file's name: the configured one, else the real data set's own name."""
        explicit = getattr(self, f"{split}_list")
        prefix = {"imagenet_lt": "ImageNet_LT", "places_lt": "Places_LT"}[self.kind]
        return explicit or f"{prefix}_{split}.txt"


class NicoData(Strict):
    """NICO++: a root folder plus ``metadata.csv`` with ``filename,split,y,a`` columns."""

    kind: Literal["nico_pp"]
    """Selects this data set: NICO++ read from ``root``."""
    root: Path
    """The data folder: the metadata file and the image paths it lists are relative to it."""
    metadata: str = "metadata.csv"
    """The metadata CSV in ``root``: columns ``filename,split,y,a`` (split 0/1/2 = train, val,
    test; ``y`` the class, ``a`` the context), found by name in its header."""
    num_classes: int = Field(60, ge=2)
    """Number of classes; every ``y`` must lie in ``[0, num_classes)``."""
    context_names: list[str] = Field(
        default_factory=lambda: ["autumn", "dim", "grass", "outdoor", "rock", "water"]
    )
    """Name of each context ``a``, in order: fills ``{context}`` in the prompts;
    ``group = y * len(context_names) + a``."""
    class_names_file: Path | None = None
    """A UTF-8 text file with one class name per line, in label order (a path of its own, not
    inside ``root``); the prompts use the names. Null: ``class 0``, ``class 1``, ..."""
    image_size: int = Field(224, ge=8)
    """Side in pixels that images are read at: shorter side resized to it, then centre-cropped
    to a square."""
    channels: Literal[3] = 3
    """Always 3: images are read as RGB, whatever their mode."""
    verify_images: bool = True
    """Decode every listed image once on Ray before anything trains, naming each file that
    fails with its metadata line."""


class _HeldOut(Strict):
    """Shared keys of the user's own layouts: how the images are read, and the fractions of
    a seeded, stratified split where the data names no validation or test split."""

    root: Path
    contexts: bool = False
    image_size: int = Field(224, ge=8)
    """Side in pixels that images are read at: shorter side resized to it, then centre-cropped
    to a square."""
    channels: Literal[1, 3] = 3
    """3 reads every image as RGB, 1 as grey, whatever its mode."""
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    """Where the data gives no validation split: the share of each class's (each group's)
    training images held out for it, chosen by ``seed``; a class keeps at least one training
    image."""
    test_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    """Where the data gives no test split: the share of each class's (each group's) training
    images held out for it, chosen by ``seed``."""
    verify_images: bool = True
    """Decode every image once on Ray before anything trains, naming each file that fails."""

    @model_validator(mode="after")
    def _fractions(self) -> _HeldOut:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction = "
                             f"{self.val_fraction + self.test_fraction:g} leaves no training "
                             f"image; keep the sum below 1")
        return self


class FolderData(_HeldOut):
    """Your own images, a folder per class as torchvision's ``ImageFolder`` reads them:
    ``root/train/<class>/*`` and ``root/val``, ``root/test`` in the same layout (each one
    absent is cut from train)."""

    kind: Literal["folder"]
    """Selects this layout: class folders under ``root/train``."""
    root: Path
    """The data folder, holding ``train/`` and optionally ``val/`` and ``test/``; every image
    (symbolic links followed) must lie inside it."""
    contexts: bool = False
    """True: the level below each class folder names a context
    (``root/train/<class>/<context>/*``), and the class x context cells are the groups, as in
    NICO++. Context names are the folder names, sorted."""


class ManifestData(_HeldOut):
    """Your own images listed in a table: a CSV or Parquet file with the columns ``path``,
    ``label`` and optionally ``context`` (or ``group``) and ``split``."""

    kind: Literal["manifest"]
    """Selects this layout: a manifest table of paths and labels."""
    root: Path
    """The data folder: relative paths in the manifest are relative to it, and every image
    (symbolic links followed) must lie inside it."""
    manifest: Path
    """The table, ``.csv`` (UTF-8, a header line) or ``.parquet``; a relative path is taken
    from ``root``. ``split`` is train / val / test (or 0 / 1 / 2); without the column the
    rows are split per class by ``val_fraction`` and ``test_fraction``."""
    num_classes: int | None = Field(None, ge=2)
    """Number of classes. Needed for integer labels (each in ``[0, num_classes)``) unless
    ``class_names_file`` gives them; with name labels it checks their count."""
    class_names_file: Path | None = None
    """A UTF-8 text file with one class name per line, in label order. With name labels, every
    label must be one of them; null: the names found in the table, sorted."""
    contexts: bool = False
    """True: the manifest's ``context`` (or ``group``) column names each image's context
    within its class, and the class x context cells are the groups, as in NICO++."""
    context_names: list[str] | None = None
    """The context names, in index order: needed for integer contexts; with name contexts,
    every one must be listed. Null: the names found in the table, sorted."""

    def manifest_path(self) -> Path:
        return self.manifest if self.manifest.is_absolute() else self.root / self.manifest


def has_groups(dataset: Any) -> bool:
    """Whether a data set config has class x context groups."""
    return dataset.kind in GROUPED_KINDS or bool(getattr(dataset, "contexts", False))


DatasetConfig = Annotated[
    DigitsLTData | DigitsGroupsData | ListFileData | NicoData | FolderData | ManifestData,
    Field(discriminator="kind")
]


class ModelConfig(Strict):
    """The classifier, built by name from ``ray_lt.train.models``."""

    name: str = "small_cnn"
    """The architecture: ``small_cnn``, or one of torchvision's, which need 3 channels:
    ``resnet50`` (NICO++), ``resnext50_32x4d`` (ImageNet-LT), ``resnet152`` (Places-LT),
    ``vit_b_16``."""
    checkpoint: Path | None = None
    """A local PyTorch state dict to start from: a ray_lt classifier of this data set, or a
    torchvision backbone (its classification layer is dropped). Null: random weights."""
    width: int = Field(32, ge=4)
    """Channels of ``small_cnn``'s first conv blocks (its features are twice this wide); the
    torchvision models ignore it."""
    mean: list[float] | None = None
    """Per-channel mean subtracted from the [0, 1] input, one value per channel. Null:
    ImageNet's for the torchvision models, 0.5 for ``small_cnn``."""
    std: list[float] | None = None
    """Per-channel standard deviation the input is divided by, one value per channel. Null:
    ImageNet's for the torchvision models, 0.5 for ``small_cnn``."""


class AugmentConfig(Strict):
    """Per-sample augmentations applied to training batches."""

    crop_padding: int = Field(0, ge=0)
    """Random shifts: zero-pad each side by this many pixels and crop back to the image size at
    a random offset; 0: off."""
    resized_crop_scale: tuple[float, float] | None = None
    """Random-resized crop: ``[low, high]`` fraction of the image's area kept (aspect ratio
    3/4 to 4/3), resized back to the image size; null: off."""
    flip: bool = False
    """Flip each image horizontally with probability 0.5."""


class TrainConfig(Strict):
    """Classifier optimisation and loss (docs/method.md §5)."""

    epochs: int = Field(30, ge=1)
    """Training epochs; an epoch is one pass over the real training rows (the synthetic rows
    are cycled as needed)."""
    batch_size: int = Field(64, ge=2)
    """Rows per batch on each worker, real and synthetic together."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """``sgd`` (Nesterov momentum when ``momentum`` > 0) or ``adamw``."""
    lr: float = Field(0.05, gt=0.0)
    """Peak learning rate, reached after the warm-up and decayed to zero by a cosine schedule
    over the epochs."""
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """SGD momentum, in [0, 1); ``adamw`` ignores it."""
    weight_decay: float = Field(5e-4, ge=0.0)
    """Weight decay of the optimizer."""
    warmup_epochs: int = Field(0, ge=0)
    """Epochs of linear learning-rate warm-up from zero to ``lr``."""
    balanced_softmax_weight: float = Field(0.0, ge=0.0, le=1.0)
    """Mix of the loss, in [0, 1]: 0 is plain cross-entropy, 1 balanced softmax (logits plus
    the log class prior, as in FG), values between mix the two (docs/method.md §5)."""
    synthetic_weight: float = Field(1.0, ge=0.0)
    """Loss weight of each synthetic row (a real row weighs 1); below 1 down-weights synthetic
    samples as DiffuLT does."""
    group_objective: Literal["erm", "reweight", "dro"] = "erm"
    """For data sets with class x context groups: ``erm`` averages the loss, ``reweight``
    weights each real row by N / (G n_g) (group-balanced in expectation), ``dro`` is online
    group DRO with step size ``dro_step_size`` (docs/method.md §5)."""
    dro_step_size: float = Field(0.01, gt=0.0)
    """Step size eta of group DRO's weights, ``q_g <- q_g exp(eta L_g)``; used with
    ``group_objective: dro``."""
    synthetic_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    """Share of each batch made of synthetic rows when there are any, in (0, 1); FG's half
    real, half synthetic is 0.5."""
    shuffle_buffer: int = Field(2048, ge=0)
    """Rows in each worker's local shuffle buffer when reading its shards; 0: rows are read in
    order, unshuffled."""
    resident_mib: int = Field(512, ge=0)
    """Each shard (train, synthetic, val) whose first pass fits in this many MiB per worker is
    kept in the worker's memory and reshuffled per epoch there: no Ray Data job per epoch.
    0: always streamed."""
    deterministic: bool = True
    """Same config and seed, same weights (on a GPU up to its nondeterministic kernels): Ray
    Data keeps block order, shuffles are seeded, torch uses deterministic algorithms."""
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    """Augmentations of the training batches."""


class ScalingSection(Strict):
    """Ray Train workers and fault tolerance."""

    num_workers: int = Field(1, ge=1)
    """Ray Train workers (DDP) that train the classifiers and the ``pixel`` generator."""
    use_gpu: bool = False
    """Give each training worker ``gpus_per_worker`` GPUs; false: train on CPUs."""
    cpus_per_worker: float = Field(1.0, gt=0.0)
    """CPUs reserved per training worker (also for the ``feature`` generator's training
    task)."""
    gpus_per_worker: float = Field(1.0, ge=0.0)
    """GPUs reserved per training worker when ``use_gpu`` is true; may be a fraction."""
    max_failures: int = Field(1, ge=0)
    """How many times a failed training run is restarted from its last checkpoint before the
    stage fails."""
    checkpoints_to_keep: int = Field(2, ge=1)
    """Checkpoints Ray Train keeps per training run (the classifiers write one per epoch, the
    ``pixel`` generator one every ``generator.checkpoint_every`` steps)."""
    poll_seconds: float = Field(0.1, gt=0.0, le=60.0)
    """How often Ray Train's controller polls its workers (Ray's
    ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by default). Every ``ray.train.report`` waits
    for the next poll, so at Ray's default each epoch of a small run waits up to 2 s."""


class EvaluateConfig(Strict):
    """Metrics (docs/method.md §6) and the Ray Data prediction pool."""

    many_threshold: int = Field(100, ge=0)
    """Classes with more training images than this are Many (100 in the papers)."""
    few_threshold: int = Field(20, ge=0)
    """Classes with fewer training images than this are Few (20 in the papers); the rest are
    Medium. Must not exceed ``many_threshold``."""
    batch_size: int = Field(256, ge=1)
    """Images per batch of the prediction pool."""
    num_actors: int = Field(1, ge=1)
    """Actors of the prediction pool (evaluation, criterion statistics, filter, quality
    metrics)."""
    cpus_per_actor: float = Field(0.5, gt=0.0)
    """CPUs reserved per prediction actor."""
    gpus_per_actor: float = Field(0.0, ge=0.0)
    """GPUs reserved per prediction actor; may be a fraction, 0 predicts on CPUs."""

    @property
    def pool(self) -> Pool:
        """The prediction pool (evaluation, statistics, filter, quality metrics)."""
        return Pool(self.num_actors, self.cpus_per_actor, self.gpus_per_actor, self.batch_size)

    @model_validator(mode="after")
    def _ordered(self) -> EvaluateConfig:
        if self.few_threshold > self.many_threshold:
            raise ValueError("few_threshold must not exceed many_threshold")
        return self


# -- generator kinds (ray_lt.generate.kinds builds each by name) -----------------------------

PROMPT_FIELDS = ("class_name", "context")


def _templates(templates: list[str]) -> list[str]:
    for template in templates:
        try:
            template.format(class_name="x", context="y")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"{template!r} is not a template with the fields "
                             f"{{class_name}} and {{context}} only ({err})") from None
    return templates


Templates = Annotated[list[str], Field(min_length=1), AfterValidator(_templates)]


class GeneratorSection(Strict):
    """Base of the generator kinds' sections; its class constants say what the rest of the
    pipeline needs to know of a kind without loading it."""

    OUTPUTS: ClassVar[Literal["images", "features"]] = "images"
    LATENT: ClassVar[bool] = False  # samples a VAE latent: the guidance decoders apply
    TRAINED: ClassVar[bool] = True  # trained here (`ray-lt train-generator`) into DIR/generator


class PixelSection(GeneratorSection):
    """``pixel`` (DiffuLT): a class- or group-conditional UNet2DModel trained from scratch."""

    kind: Literal["pixel"] = "pixel"
    """Selects this generator; a generator section that names no kind is ``pixel``."""
    condition_on: Literal["class", "group", "class+context"] = "class"
    """What a sample is conditioned on: its class, its class x context group (one id per
    group), or ``class+context``: summed class and context embeddings, so that a group with no
    training image is composed of parts that had some. The last two need groups."""
    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64, 64])
    """Channels of the UNet's resolution levels, one down and one up block each."""
    layers_per_block: int = Field(1, ge=1)
    """ResNet layers in each UNet block."""
    attention: bool = True
    """Self-attention in the UNet's second level (when it has at least two)."""
    train_steps: int = Field(1500, ge=1)
    """Optimizer steps of the generator's training."""
    batch_size: int = Field(64, ge=1)
    """Training images per step on each worker, drawn at random."""
    lr: float = Field(2e-4, gt=0.0)
    """AdamW learning rate (constant, no weight decay)."""
    label_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Probability that a training sample's condition is replaced by the null one, which
    trains the unconditional branch of classifier-free guidance; with ``class+context`` the
    context alone is dropped as often too."""
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    """Decay of the weights' exponential moving average; the exported generator uses the
    averaged weights."""
    checkpoint_every: int = Field(250, ge=1)
    """Steps between checkpoints (where an interrupted training resumes) and loss reports."""
    threads: int | None = Field(None, ge=1)
    """Torch threads of the training worker; null: torch's default."""
    train_on: Literal["long_tail", "external"] = "long_tail"
    """What the generator learns from: ``long_tail``, the classifier's own long-tailed
    training split (DiffuLT's setting: for a rare class it can only recombine a few images);
    ``external``, a pool of real images that none of the classifier's splits holds (as Stable
    Diffusion has seen the web), so that guidance has different images to choose between. The
    digits build their pool from the digits their splits leave over
    (``generator.external_per_class``); the file data sets read ``generator.external``."""
    external: Path | None = None
    """With ``train_on: external`` on a file data set: the pool, as a folder
    ``<class>/<image>`` (``<class>/<context>/<image>`` with contexts) or a manifest (.csv or
    .parquet with the columns path, label and, with contexts, context; paths relative to the
    manifest's folder). Its classes (contexts) are names of the data set's; no file of it may
    be one of the data set's."""
    external_per_class: int = Field(40, ge=1)
    """With ``train_on: external`` on the digits: digits per class in the pool, taken from
    those no split holds (on ``digits_groups`` each is drawn once in every context, so every
    class x context group is in the pool, the empty ones included)."""


class FeatureSection(GeneratorSection):
    """``feature`` (LDMLR): a class-conditional denoiser over the baseline's features."""

    OUTPUTS: ClassVar[Literal["images", "features"]] = "features"
    kind: Literal["feature"]
    """Selects this generator: samples feature vectors, not images."""
    train_steps: int = Field(1500, ge=1)
    """Optimizer steps of the denoiser's training."""
    batch_size: int = Field(64, ge=1)
    """Feature vectors per step, drawn at random from the training set's."""
    lr: float = Field(2e-4, gt=0.0)
    """AdamW learning rate."""
    label_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Probability that a training sample's class is replaced by the null class, which trains
    the unconditional branch of classifier-free guidance."""


class PretrainedSection(GeneratorSection):
    """A pretrained Stable Diffusion read offline from a local folder in the diffusers layout,
    or a model id already in the local Hugging Face cache (never downloaded)."""

    LATENT: ClassVar[bool] = True
    TRAINED: ClassVar[bool] = False
    pretrained: str | None = None
    """A local folder in the diffusers layout, or a model id already in the local Hugging Face
    cache; required (nothing is downloaded)."""
    prompts: Templates = Field(default_factory=lambda: ["a photo of a {class_name}"])
    """Prompt templates, one drawn per sample by its seed; ``{class_name}`` and ``{context}``
    are filled in (``{context}`` needs a data set with contexts)."""
    prompts_file: Path | None = None
    """JSON lines ``{"class": name or index, "prompts": [template, ...]}``: those classes use
    these templates instead of ``prompts`` (``ray-lt mine`` writes one); null: none."""
    negative_prompt: str = ""
    """The prompt of classifier-free guidance's unconditional branch (``synthesis.cfg_scale``);
    empty by default."""
    height: int | None = Field(None, ge=8)
    """Height in pixels of the images sampled, a multiple of the VAE's factor; null: the
    UNet's own (sample_size x the VAE's factor)."""
    width: int | None = Field(None, ge=8)
    """Width in pixels of the images sampled, a multiple of the VAE's factor; null: the UNet's
    own (sample_size x the VAE's factor)."""


class UnCLIPSection(PretrainedSection):
    """``unclip``: Stable Diffusion 2.1 unCLIP, text + a real image's CLIP embedding (FG)."""

    kind: Literal["unclip"]
    """Selects this generator: Stable Diffusion 2.1 unCLIP."""
    embedding_dropout: float = Field(0.5, ge=0.0, le=1.0)
    """Probability that a sample's CLIP image embedding is dropped (set to zero), for
    diversity; FG uses 0.5."""
    noise_level: int = Field(0, ge=0)
    """Noise that unCLIP adds to the image embedding, a step of its image-noising schedule
    (below its number of timesteps); 0: none, as in FG."""
    references_per_group: int = Field(8, ge=1)
    """Real training images per class and per group, chosen by the seed, whose embeddings
    condition the samples; they are embedded once per run."""


class SDSection(PretrainedSection):
    """``sd``: Stable Diffusion 1.x / 2.x text-to-image (LTG's SD 1.4)."""

    kind: Literal["sd"]
    """Selects this generator: Stable Diffusion 1.x / 2.x text-to-image."""


class SDXLSection(PretrainedSection):
    """``sdxl``: Stable Diffusion XL text-to-image (two text encoders, pooled embeddings)."""

    kind: Literal["sdxl"]
    """Selects this generator: Stable Diffusion XL text-to-image."""


GENERATOR_SECTIONS: dict[str, type[GeneratorSection]] = {
    cls.model_fields["kind"].annotation.__args__[0]: cls
    for cls in (PixelSection, FeatureSection, UnCLIPSection, SDSection, SDXLSection)}
GeneratorConfig = Annotated[
    PixelSection | FeatureSection | UnCLIPSection | SDSection | SDXLSection,
    Field(discriminator="kind")]


class FilterConfig(Strict):
    """DiffuLT filtering of generated samples with the real-data classifier."""

    enabled: bool = False
    """Run the filter after synthesis: the samples it marks are left out of training and
    counted per class in ``synthetic/filter_report.csv``."""
    confidence_threshold: float = Field(0.9, gt=0.0, le=1.0)
    """Drop a sample that the baseline classifier puts in another class with at least this
    confidence, in (0, 1]."""
    distance_quantile: float | None = Field(None, gt=0.0, lt=1.0)
    """Also drop a sample whose features lie farther from its class's mean real feature than
    this quantile of the real images' distances, in (0, 1); null: no distance test."""


class SynthesisConfig(Strict):
    """Feedback-guided sampling to the quotas (docs/method.md §1-4)."""

    num_steps: int = Field(30, ge=1)
    """DDIM steps per sample (30 in FG, 50 in LTG)."""
    cfg_scale: float = Field(3.0, ge=0.0)
    """Classifier-free guidance scale s, ``eps_uncond + s * (eps_cond - eps_uncond)``; 3 in
    FG, 1 uses the conditional prediction alone."""
    eta: float = Field(0.0, ge=0.0, le=1.0)
    """DDIM's eta, in [0, 1]: 0 is deterministic DDIM, above 0 adds fresh noise at each step
    (drawn from the sample's own seed)."""
    init: Literal["noise", "real"] = "noise"
    """``noise``: text-to-image. ``real``: img2img (DA-Fusion's real guidance): a real training
    image of the sample's class (group), chosen by its seed, noised to the step ``strength``
    names and denoised from there. Not for the ``feature`` generator."""
    strength: float = Field(1.0, gt=0.0, le=1.0)
    """With ``init: real``, the share of the ``num_steps`` DDIM steps that are run, in
    (0, 1]; below 1 needs ``init: real``, and 1 is the text-to-image sample of the same
    seed."""
    guidance_scale: float = Field(0.03, ge=0.0)
    """Feedback-guidance scale w, the mean over the samples when ``scale_by`` is set; FG uses
    0.03 in the normalised form, 0 samples without guidance."""
    scale_by: Literal["none", "count", "val_error"] = "none"
    """Per-class (per-group with balance: group) strength: ``count`` scales class c's guidance
    by (n_c + 1)^-scale_slope, ``val_error`` by (e_c + 0.01)^scale_slope with e_c the
    baseline's validation error on c, normalised so that the mean scale over the samples drawn
    stays guidance_scale (docs/method.md §2). ``none``: one scale for all."""
    scale_slope: float = Field(0.5, ge=0.0)
    """The slope s of ``scale_by``; 0 gives every class the same scale."""
    guidance_every: int = Field(5, ge=1)
    """Apply the criterion gradient every this many DDIM steps (k; every 5 of 30 in FG)."""
    guidance_mode: Literal["normalized", "eps"] = "normalized"
    """``normalized``: add ``w * g * ||z_t|| / ||g||`` to z_t, as the FG authors' release does
    (what its scale 0.03 is meant for); ``eps``: shift the noise prediction by
    ``w * sqrt(1 - abar_t) * g``."""
    reuse_gradient: bool = False
    """Also apply the last criterion gradient on the steps between guided steps."""
    through_unet: bool = False
    """Back-propagate the criterion through the UNet too, as the FG release does (dearer);
    false: through the predicted x0's dependence on z_t only."""
    criteria: dict[str, float] = Field(default_factory=lambda: {"entropy": 1.0})
    """Criterion name -> probability that a sample is guided by it; the probabilities are
    >= 0 and sum to 1. Names: entropy, loss, hardness, total_uncertainty, and on data sets
    with groups target_group, group_entropy."""
    balance: Literal["class", "group"] = "class"
    """Fill each class to ``target``, or each class x context group (data sets with
    groups)."""
    target: int | None = Field(None, ge=1)
    """Real + synthetic images per class (per group); null: the largest class's (group's)
    count. FG: 1,300 on ImageNet-LT, 4,980 on Places-LT, 811 per group on NICO++."""
    quota_scale: float = Field(1.0, gt=0.0, le=1.0)
    """Factor in (0, 1] applied to every quota, for smaller budgets."""
    quota_minimum: int = Field(0, ge=0)
    """At least this many synthetic images per class (group), even where real images already
    reach ``target``; 1 is the FG release's ``max(1300 - n_c, 1)``."""
    max_shard_size: int = Field(64, ge=1)
    """Most samples in one shard: one seed, one Parquet file, the unit redrawn after a
    failure."""
    batch_size: int = Field(32, ge=1)
    """Samples a sampler actor denoises together; a sample depends on its seed only, not on
    its batch."""
    num_actors: int = Field(1, ge=1)
    """Sampler actors; the pool goes on with as many as the cluster can place, at least one."""
    cpus_per_actor: float = Field(1.0, gt=0.0)
    """CPUs reserved per sampler actor."""
    gpus_per_actor: float = Field(0.0, ge=0.0)
    """GPUs reserved per sampler actor; may be a fraction, 0 samples on CPUs."""
    writer_cpus: float = Field(0.25, gt=0.0)
    """CPUs per actor of the PNG / Parquet writer pool."""
    writer_actors: int = Field(1, ge=1)
    """The writer pool grows from 1 up to this many actors."""
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Autocast precision of the UNet, the decode and the classifier on a GPU; on a CPU
    everything runs in float32."""
    guidance_micro_batch: int | None = Field(None, ge=1)
    """The criterion gradient of a guided step, taken in micro-batches of this many samples
    (null: the whole batch at once); exact, it bounds memory (docs/performance.md)."""
    guidance_decoder: Literal["vae", "tiny", "latent_resize"] = "vae"
    """What decodes the predicted x0 for the criterion (the pretrained kinds: unclip, sd,
    sdxl): the full VAE, a tiny AutoencoderTiny from ``tiny_decoder``, or the full VAE on the
    latent resized so that it decodes straight to the classifier's input size. Final images
    always use the full VAE."""
    tiny_decoder: str | None = None
    """Local folder of an AutoencoderTiny (TAESD-style weights, fetched beforehand); needed by
    ``guidance_decoder: tiny``."""
    decoder_checkpointing: bool = False
    """Gradient checkpointing in the guidance decoder: less memory, recomputed activations."""
    compile: bool = False
    """torch.compile the UNet and the guidance decode (the pretrained kinds); each actor's
    first batch compiles."""
    compile_mode: str | None = None
    """torch.compile's mode, e.g. ``"max-autotune-no-cudagraphs"``; null: its default."""
    epistemic_heads: int = Field(5, ge=2)
    """K, the linear heads of the epistemic head behind ``total_uncertainty`` (LTG), each
    fitted on a bootstrap resample."""
    hardness_covariance: Literal["full", "tied"] = "full"
    """Covariance of the ``hardness`` criterion: ``full``, one per class (C x d x d floats,
    refused above 2 GiB), or ``tied``, one shared by the classes."""
    filter: FilterConfig = Field(default_factory=FilterConfig)
    """Filtering of the generated samples (DiffuLT)."""
    grid_scales: list[float] | None = None
    """Guidance scales of the sample grid's columns; null: chosen from the guidance sweep,
    from 0 up to the first of ``sweep_scales`` where the judge's in-class rate has fallen by
    ``sweep_drop`` (at most ``grid_columns`` of them)."""
    grid_columns: int = Field(5, ge=2)
    """The most columns a grid chosen from the sweep has."""
    sweep_scales: list[float] = Field(
        default_factory=lambda: [0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0])
    """Guidance scales of the guidance sweep (``report/guidance_sweep.csv`` and ``.png``):
    the grid's class drawn with the same seeds at each, per grid criterion, and measured: the
    guide's criterion, the guide's and an independent judge's in-class rates, the distance to
    the nearest training image. ``grid_scales`` are added to them."""
    sweep_samples: int = Field(8, ge=1)
    """Samples per criterion and scale of the sweep (the grid shows the first
    ``grid_samples``)."""
    sweep_drop: float = Field(0.1, gt=0.0, le=1.0)
    """How far the judge's in-class rate (mean over the grid criteria) falls from its value at
    the smallest scale where a grid chosen from the sweep ends."""
    grid_criteria: list[str] = Field(
        default_factory=lambda: ["entropy", "loss", "hardness", "total_uncertainty"])
    """Criteria of the sample grid's rows."""
    grid_class: int = Field(-1, ge=-1)
    """The class the sample grid shows; -1: the one with the fewest training images."""
    grid_samples: int = Field(4, ge=1)
    """Samples per grid cell, with the same seeds in every cell."""

    @property
    def pool(self) -> Pool:
        """The sampler actor pool: goes on with as many of ``num_actors`` as the cluster can
        place, at least one; one shard per call (``batch_size`` is the sampler's batch)."""
        return Pool(self.num_actors, self.cpus_per_actor, self.gpus_per_actor, 1, min_size=1,
                    initial_size=self.num_actors)

    @property
    def reference_pool(self) -> Pool:
        """The pool that embeds unCLIP's reference images once per run: the samplers' size
        and resources, 64 images a batch."""
        return Pool(self.num_actors, self.cpus_per_actor, self.gpus_per_actor, 64)

    @property
    def writer_pool(self) -> Pool:
        """The CPU pool after the samplers that encodes and writes each shard's file."""
        return Pool(self.writer_actors, self.writer_cpus, 0.0, 1, min_size=1)

    @model_validator(mode="after")
    def _criteria(self) -> SynthesisConfig:
        known = set(CRITERION_NAMES)
        unknown = sorted(set(self.criteria) - known)
        if unknown:
            raise ValueError(f"criteria: unknown {unknown}; choose from {sorted(known)}")
        if not self.criteria or any(p < 0 for p in self.criteria.values()) or \
                abs(sum(self.criteria.values()) - 1.0) > 1e-6:
            raise ValueError("criteria: probabilities must be >= 0 and sum to 1")
        if self.guidance_decoder == "tiny" and not self.tiny_decoder:
            raise ValueError("tiny_decoder: guidance_decoder 'tiny' needs the local folder of an "
                             "AutoencoderTiny (TAESD-style weights) in synthesis.tiny_decoder")
        if self.strength < 1 and self.init == "noise":
            raise ValueError(f"strength: {self.strength:g} starts from a noised real image; set "
                             f"synthesis.init: real, or strength: 1")
        if self.num_steps * self.strength < 1:
            raise ValueError(f"strength: {self.strength:g} x num_steps {self.num_steps} leaves "
                             f"no denoising step; raise it to at least {1 / self.num_steps:.3g}")
        if self.grid_samples > self.sweep_samples:
            raise ValueError(f"grid_samples: {self.grid_samples} samples per grid cell, but the "
                             f"sweep draws sweep_samples: {self.sweep_samples}; raise it")
        if any(x < 0 for x in self.sweep_scales + (self.grid_scales or [])) or \
                not self.sweep_scales:
            raise ValueError("sweep_scales, grid_scales: guidance scales are >= 0 (and the "
                             "sweep has at least one)")
        return self

    def sweep_and_grid_scales(self) -> list[float]:
        """The sweep's scales with the grid's fixed ones added, sorted."""
        return sorted(set(self.sweep_scales) | set(self.grid_scales or []))


class FinalConfig(Strict):
    """The classifier trained on real + synthetic data: from scratch (FG) or fine-tuned from the
    baseline (LTG); unset values fall back to the ``train`` section."""

    init: Literal["scratch", "baseline"] = "scratch"
    """``scratch``: new weights (FG); ``baseline``: fine-tune the baseline classifier (LTG,
    and required by the ``feature`` generator, LDMLR)."""
    epochs: int | None = Field(None, ge=1)
    """Epochs of the final training; null: ``train.epochs``."""
    lr: float | None = Field(None, gt=0.0)
    """Peak learning rate of the final training; null: ``train.lr``."""
    balanced_softmax_weight: float | None = Field(None, ge=0.0, le=1.0)
    """Balanced-softmax mix of the final training, in [0, 1]; null:
    ``train.balanced_softmax_weight``."""
    group_objective: Literal["erm", "reweight", "dro"] | None = None
    """Group objective of the final training (data sets with groups); null:
    ``train.group_objective``."""


class RoundsConfig(Strict):
    """Closed-loop synthesis (LTG, docs/method.md §7): the quota is generated in ``count``
    equal shares; after each share but the last the guide is fine-tuned for ``epochs`` epochs
    on real + all synthetic rows so far (its own ``train`` loss, learning rate ``lr`` or
    train.lr), its criterion statistics and heads refitted, and the next share is guided by
    it. ``count: 1`` is one-shot synthesis guided by the baseline."""

    count: int = Field(1, ge=1)
    """Rounds R: the quota is drawn in R equal shares; 1 is one-shot synthesis (LTG's setting,
    ``configs/imagenet_lt_sd.yaml``, uses 3)."""
    epochs: int = Field(5, ge=1)
    """Epochs of each fine-tune of the guide between rounds."""
    lr: float | None = Field(None, gt=0.0)
    """Learning rate of those fine-tunes (no warm-up); null: ``train.lr``."""


class MiningConfig(Strict):
    """Generative data mining (LTG, docs/method.md §7): after each round but the last, a local
    vision-language model describes each mined class's hardest and easiest samples, the
    keywords that set the hard ones apart are scored, and prompts written from them drive the
    next round (``ray-lt mine`` does the same on a finished run). Text-conditioned generators
    only (unclip, sd, sdxl); nothing is downloaded."""

    enabled: bool = False
    """Mine between rounds (``rounds.count`` > 1)."""
    classes: Literal["few", "all"] | list[int | str] = "few"
    """The classes mined: ``few`` (fewer training images than evaluate.few_threshold),
    ``all``, or a list of class names or indices."""
    k: int = Field(8, ge=1)
    """Samples in each of a class's two sets: the k its guide scored hardest (highest
    criterion on the final sample) and the k easiest (fewer when the round drew fewer than 2k
    of the class)."""
    vlm: Path | None = None
    """Local folder of a vision-language model for ``AutoProcessor`` +
    ``AutoModelForImageTextToText`` (e.g. a LLaVA-1.6 or Qwen2-VL); required when mining."""
    describe_prompt: str = Field("Describe this image in one sentence.", min_length=1)
    """What the vision-language model is asked of every image."""
    max_new_tokens: int = Field(48, ge=1)
    """Tokens generated per description (and per prompt by ``mining.llm``), greedily."""
    keywords: int = Field(8, ge=1)
    """Keywords kept per class, best first."""
    min_count: int = Field(2, ge=1)
    """A keyword must be in at least this many of the hard set's descriptions."""
    prior: float = Field(0.5, gt=0.0)
    """Pseudo-count added to each count of the keywords' log-odds ratio."""
    prompts: int = Field(40, ge=1)
    """Prompts written per mined class (LTG's P = 40)."""
    llm: Path | None = None
    """Local folder of an instruct language model (``AutoModelForCausalLM`` with a chat
    template) that writes the prompts from the keywords; null: templates over the
    keywords."""
    num_actors: int = Field(1, ge=1)
    """Actors of the mining pool (each loads the models once)."""
    cpus_per_actor: float = Field(1.0, gt=0.0)
    """CPUs of each mining actor."""
    gpus_per_actor: float = Field(0.0, ge=0.0)
    """GPUs of each mining actor (0: the models run on CPUs)."""
    batch_size: int = Field(8, ge=1)
    """Images described per forward pass."""

    @property
    def pool(self) -> Pool:
        """The mining actor pool."""
        return Pool(self.num_actors, self.cpus_per_actor, self.gpus_per_actor, self.batch_size)


class ReportConfig(Strict):
    """What ``ray-lt run`` puts in ``report.md`` / ``report.html`` besides the metrics."""

    grid: bool = True
    """Draw the sample grid of ``synthesis.grid_class`` (criteria x guidance scales) and show
    it; image generators only."""
    quality: bool = True
    """Measure the synthetic data's quality (FID, density and coverage on the baseline's
    features, against real test images) and show it."""
    quality_k: int = Field(5, ge=1)
    """k of the k-nearest-neighbour balls of density and coverage."""
    samples_per_class: int = Field(8, ge=1)
    """Synthetic images shown per class in the report's sample mosaic (of the rarest
    classes)."""


def _ordered(bounds: tuple[float, float]) -> tuple[float, float]:
    if not bounds[0] < bounds[1]:
        raise ValueError("the range must be [low, high] with low < high")
    return bounds


def _unit(bounds: tuple[float, float]) -> tuple[float, float]:
    if bounds[0] < 0 or bounds[1] > 1:
        raise ValueError("the range must lie in [0, 1]")
    return bounds


def _positive(bounds: tuple[float, float]) -> tuple[float, float]:
    if bounds[0] <= 0:
        raise ValueError("searched on a log scale, so low must be > 0")
    return bounds


def _non_negative(bounds: tuple[float, float]) -> tuple[float, float]:
    if bounds[0] < 0:
        raise ValueError("a loss weight cannot be negative: low must be >= 0")
    return bounds


def _criteria_names(names: list[str]) -> list[str]:
    known = sorted(CRITERION_NAMES)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"unknown criteria {unknown}; choose from {known}")
    if len(set(names)) < 2:
        raise ValueError(f"{len(set(names))} distinct criteria leave no mixture to search; name "
                         f"at least two of {known}, or null to keep synthesis.criteria")
    return names


Range = Annotated[tuple[float, float], AfterValidator(_ordered)]
UnitRange = Annotated[Range, AfterValidator(_unit)]
LogRange = Annotated[Range, AfterValidator(_positive)]
WeightRange = Annotated[Range, AfterValidator(_non_negative)]


class SearchSpace(Strict):
    """Ranges searched by ``ray-lt tune``; a key set to null is not searched. ``criteria``
    names the criteria whose mixture weights are searched."""

    guidance_scale: LogRange | None = (0.003, 0.3)
    """``[low, high]`` of ``synthesis.guidance_scale``, searched on a log scale (low > 0)."""
    embedding_dropout: UnitRange | None = None
    """``[low, high]`` within [0, 1] of ``generator.embedding_dropout`` (``unclip`` only)."""
    criteria: Annotated[list[str], AfterValidator(_criteria_names)] | None = None
    """At least two criteria whose mixture weights are searched (each in [0, 1], normalised
    into ``synthesis.criteria``); null: keep ``synthesis.criteria``."""
    synthetic_weight: WeightRange | None = (0.2, 1.0)
    """``[low, high]`` of ``train.synthetic_weight`` (low >= 0)."""
    balanced_softmax_weight: UnitRange | None = None
    """``[low, high]`` within [0, 1] of ``final.balanced_softmax_weight``."""
    scale_slope: WeightRange | None = None
    """``[low, high]`` of ``synthesis.scale_slope`` (low >= 0); needs synthesis.scale_by:
    count (or val_error)."""
    rounds: list[Annotated[int, Field(ge=1)]] | None = None
    """Values of rounds.count, chosen among these; not with the ``feature`` generator."""
    final_group_objective: list[Literal["erm", "reweight", "dro"]] | None = None
    """The final model's group objective, chosen among these (data sets with groups)."""


class TuneSection(Strict):
    """Ray Tune + Optuna around synthesis and final training (``ray-lt tune``)."""

    num_trials: int = Field(8, ge=1)
    """Trials Optuna runs."""
    max_concurrent_trials: int = Field(1, ge=1)
    """Trials run at the same time."""
    objective: Literal["few", "worst_group", "both", "unseen_groups"] = "few"
    """Validation accuracy maximised: ``few``, ``worst_group``, ``both`` (Few and worst-group,
    a Pareto front), or ``unseen_groups``: accuracy on the class x context groups with no
    training image, and worst-group accuracy beside it (two objectives, a Pareto front)."""
    quota_scale: float = Field(1.0, gt=0.0, le=1.0)
    """Factor in (0, 1] on each trial's quota (on top of ``synthesis.quota_scale``);
    ``best_config.yaml`` keeps the full quota."""
    trial_cpus: float = Field(0.0, ge=0.0)
    """CPUs reserved by each trial's driver; 0 reserves memory alone, leaving the CPUs to the
    Ray Data tasks and Train workers it starts."""
    trial_memory_mb: int = Field(512, ge=1)
    """Memory in MiB reserved by each trial's driver."""
    space: SearchSpace = Field(default_factory=SearchSpace)
    """The ranges searched."""


class RayConfig(Strict):
    """Where to run: None connects to RAY_ADDRESS when set (ray job submit), else starts Ray.
    ``autoscaler_config``: the cluster's autoscaler config (``cluster.yaml``), read for the
    node types it may add when they cannot be found otherwise (``ray_lt.cluster``)."""

    address: str | None = None
    """Address of the Ray cluster to connect to; null: RAY_ADDRESS when set, else a cluster
    started on this machine that is still running, else Ray is started here."""
    autoscaler_config: str | None = None
    """Path of the cluster's autoscaler config (``cluster.yaml``), read for the node types it
    may add; null: found from the cluster where it can be."""


class Config(Strict):
    """A complete ray_lt run."""

    seed: int = 0
    """The run's seed: the digits' splits, training, every shard's samples and the search
    derive from it."""
    dataset: DatasetConfig
    """The long-tailed data set, picked by ``dataset.kind``."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The classifier's architecture and starting weights."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """How the classifiers are trained."""
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    """Ray Train workers and their resources."""
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    """Metrics and the prediction pool."""
    generator: GeneratorConfig = Field(default_factory=PixelSection)
    """The diffusion model that synthesis guides, picked by ``generator.kind``."""
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig)
    """Feedback-guided sampling to the quotas."""
    final: FinalConfig = Field(default_factory=FinalConfig)
    """The classifier trained on real + synthetic data."""
    rounds: RoundsConfig = Field(default_factory=RoundsConfig)
    """Closed-loop synthesis rounds."""
    mining: MiningConfig = Field(default_factory=MiningConfig)
    """What the guide's hardest samples have in common, in words, and the prompts made of it."""
    report: ReportConfig = Field(default_factory=ReportConfig)
    """What the report shows."""
    tune: TuneSection = Field(default_factory=TuneSection)
    """The search of ``ray-lt tune``."""
    ray: RayConfig = Field(default_factory=RayConfig)
    """Which Ray cluster to use."""

    def criteria_in_use(self) -> set[str]:
        """Every criterion the config may score with: synthesis, the grid's rows, the search."""
        return (set(self.synthesis.criteria) | set(self.synthesis.grid_criteria)
                | set(self.tune.space.criteria or []))

    @model_validator(mode="before")
    @classmethod
    def _generator_kind(cls, raw: Any) -> Any:
        """A generator section that names no kind is the default one, ``pixel``."""
        if isinstance(raw, dict) and isinstance(raw.get("generator"), dict) \
                and "kind" not in raw["generator"]:
            raw = {**raw, "generator": {"kind": "pixel", **raw["generator"]}}
        return raw

    @model_validator(mode="after")
    def _generator_fits(self) -> Config:
        g, s = self.generator, self.synthesis
        problems = []
        if s.guidance_decoder != "vae" and not g.LATENT:
            problems.append(f"synthesis.guidance_decoder: {s.guidance_decoder!r} decodes a VAE "
                            f"latent, and generator.kind {g.kind!r} has none; use 'vae'")
        if s.init == "real" and g.OUTPUTS == "features":
            problems.append(f"synthesis.init: 'real' starts from a real image, and generator.kind "
                            f"{g.kind!r} samples feature vectors; use 'noise'")
        if g.LATENT and self.dataset.channels != 3:
            problems.append(f"dataset.channels: {self.dataset.channels}, but generator.kind "
                            f"{g.kind!r} makes RGB images for the classifier; set "
                            f"dataset.channels: 3")
        templates = getattr(g, "prompts", [])
        if any("{context}" in t for t in templates) and not has_groups(self.dataset):
            problems.append(f"generator.prompts: {{context}} needs a data set with contexts "
                            f"({', '.join(GROUPED_KINDS)}, or folder / manifest with "
                            f"dataset.contexts: true), not {self.dataset.kind!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _external_pool(self) -> Config:
        g = self.generator
        if getattr(g, "train_on", "long_tail") != "external":
            if getattr(g, "external", None) is not None:
                raise ValueError("generator.external: a pool is named, but generator.train_on "
                                 "is 'long_tail'; set generator.train_on: external to use it")
            return self
        d = self.dataset
        if isinstance(d, DigitsLTData | DigitsGroupsData):
            if g.external is not None:
                raise ValueError(f"generator.external: dataset.kind {d.kind!r} builds its pool "
                                 f"from the digits its splits leave over; remove the key "
                                 f"(generator.external_per_class sets the pool's size)")
            if isinstance(d, DigitsLTData):
                used, keys = (d.max_per_class + d.val_per_class + d.test_per_class,
                              "dataset.max_per_class + val_per_class + test_per_class")
            else:
                used = d.train_per_class + (d.val_per_group + d.test_per_group) * len(
                    d.context_names)
                keys = "dataset.train_per_class + (val_per_group + test_per_group) * contexts"
            if used + g.external_per_class > DIGITS_PER_CLASS_MIN:
                raise ValueError(
                    f"generator.external_per_class: {g.external_per_class}, but {keys} = {used} "
                    f"leave {DIGITS_PER_CLASS_MIN - used} of the rarest digit's "
                    f"{DIGITS_PER_CLASS_MIN} images for the pool")
        elif g.external is None:
            raise ValueError(f"generator.external: generator.train_on: external on dataset.kind "
                             f"{d.kind!r} needs the pool's folder or manifest")
        return self

    @model_validator(mode="after")
    def _mining_fits(self) -> Config:
        m = self.mining
        if not m.enabled:
            return self
        if not isinstance(self.generator, PretrainedSection):
            kinds = [k for k, cls in GENERATOR_SECTIONS.items()
                     if issubclass(cls, PretrainedSection)]
            raise ValueError(f"mining.enabled: mining writes prompts, and generator.kind "
                             f"{self.generator.kind!r} takes none; use a kind that takes "
                             f"prompts ({', '.join(kinds)}) or set mining.enabled: false")
        if self.rounds.count < 2:
            raise ValueError("mining.enabled: mining runs between rounds, and rounds.count is "
                             "1; set rounds.count to 2 or more, or run `ray-lt mine` on the "
                             "finished run")
        if m.vlm is None:
            raise ValueError("mining.vlm: mining.enabled needs the local folder of a "
                             "vision-language model (AutoModelForImageTextToText)")
        return self

    @model_validator(mode="after")
    def _groups_needed(self) -> Config:
        if has_groups(self.dataset):
            final = self.final.group_objective or self.train.group_objective
            tuned = self.train.group_objective if self.rounds.count > 1 else "erm"
            if self.synthesis.balance == "class" and "dro" in (final, tuned):
                key = "final.group_objective" if final == "dro" else "train.group_objective"
                raise ValueError(f"{key}: 'dro' trains on synthetic rows here, and with "
                                 f"synthesis.balance: class they carry no group; set "
                                 f"synthesis.balance: group or another objective")
            return self
        problems = []
        searched = self.tune.space.criteria or []
        for key, names in (("synthesis.criteria", list(self.synthesis.criteria)),
                           ("synthesis.grid_criteria", self.synthesis.grid_criteria),
                           ("tune.space.criteria", searched)):
            wrong = [n for n in names if n in GROUP_CRITERION_NAMES]
            if wrong:
                problems.append(f"{key}: {wrong} score class x context groups")
        for key, value in (("train.group_objective", self.train.group_objective),
                           ("final.group_objective", self.final.group_objective)):
            if value not in (None, "erm"):
                problems.append(f"{key}: {value!r} trains for the worst group")
        if self.tune.space.final_group_objective:
            problems.append("tune.space.final_group_objective: searches a group objective")
        if problems:
            raise ValueError("; ".join(problems) + f", but dataset.kind {self.dataset.kind!r} "
                             f"has no groups (those with groups: {', '.join(GROUPED_KINDS)}, and "
                             f"folder / manifest with dataset.contexts: true)")
        return self


def check_paths(cfg: Config) -> None:
    """The data folder and classifier checkpoint the config names exist (before Ray starts)."""
    root = getattr(cfg.dataset, "root", None)
    if root is not None and not Path(root).is_dir():
        raise DataError(f"dataset.root: data folder {root} does not exist")
    if cfg.model.checkpoint is not None and not Path(cfg.model.checkpoint).is_file():
        raise ConfigError(f"model.checkpoint: file {cfg.model.checkpoint} does not exist")


def final_train_config(cfg: Config) -> TrainConfig:
    """The ``train`` section with the ``final`` section's overrides applied."""
    changes = {k: v for k, v in cfg.final.model_dump().items()
               if k in ("epochs", "lr", "balanced_softmax_weight", "group_objective")
               and v is not None}
    return cfg.train.model_copy(update=changes)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings to a nested dict; values are parsed as YAML scalars/lists."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE")
        parts = key.strip().split(".")
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"--set {item!r}: {where} is a value, not a section")
            node = child
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: value is not valid YAML: {err}") from err
        if len(parts) == 2 and parts[1] == "kind" and parts[0] in KINDED_SECTIONS:
            _switch_kind(node, parts[0], value)
        node[parts[-1]] = value
    return raw


def _switch_kind(node: dict[str, Any], section: str, kind: Any) -> None:
    """``--set SECTION.kind=KIND`` over a section of another kind: the keys KIND does not have
    are dropped (named in a warning), so that one override switches kinds."""
    new = KINDED_SECTIONS[section].get(kind) if isinstance(kind, str) else None
    if new is None or node.get("kind", kind) == kind:
        return
    dropped = [key for key in node if key != "kind" and key not in new.model_fields]
    for key in dropped:
        del node[key]
    if dropped:
        logging.getLogger(__name__).warning(
            f"--set {section}.kind={kind}: dropped {section} keys {kind} does not have: "
            f"{', '.join(dropped)}")


DATASET_KINDS: dict[str, type[Strict]] = {
    kind: cls for cls in (DigitsLTData, DigitsGroupsData, ListFileData, NicoData, FolderData,
                          ManifestData)
    for kind in cls.model_fields["kind"].annotation.__args__}


# Sections with a ``kind`` that picks their class, as the discriminated unions above do.
KINDED_SECTIONS: dict[str, dict[str, type[Strict]]] = {"dataset": DATASET_KINDS,
                                                       "generator": GENERATOR_SECTIONS}


def _kinds(raw: dict[str, Any]) -> dict[str, str | None]:
    """The kind each kinded section of ``raw`` names (a generator without one: pixel)."""
    kinds = {}
    for name in KINDED_SECTIONS:
        section = raw.get(name)
        kinds[name] = section.get("kind") if isinstance(section, dict) else None
    if kinds["generator"] is None:
        kinds["generator"] = "pixel"
    return kinds


def _kind_key_note(section: str, key: str, kind: str | None) -> str:
    """For a key of a kinded section that the chosen kind lacks: which kinds have it."""
    owners = [k for k, cls in KINDED_SECTIONS[section].items()
              if key in cls.model_fields and k != kind]
    if not owners:
        return ""
    return (f" (it is a key of {section}.kind {', '.join(owners)}, not {kind}; remove it when "
            f"switching kinds)")


def _section(path: list[str], kinds: dict[str, str | None]) -> type[BaseModel] | None:
    """The config class of the section at ``path`` (keys from the top), None if there is none."""
    section: type[BaseModel] | None = Config
    for key in path:
        field = section.model_fields.get(key) if section else None
        if field is None:
            return None
        if section is Config and key in KINDED_SECTIONS:
            section = KINDED_SECTIONS[key].get(kinds.get(key) or "")
        else:
            section = section_model(field.annotation)
    return section


def section_model(annotation: Any) -> type[BaseModel] | None:
    """The config class a field holds (``X``, ``X | None``), None for a plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for a in get_args(annotation) if (m := section_model(a))), None)


def _suggestion(loc: list[str], kinds: dict[str, str | None]) -> str:
    """For a misspelled key: the nearest key of its section."""
    section = _section(loc[:-1], kinds)
    close = difflib.get_close_matches(loc[-1], list(section.model_fields) if section else [], 1)
    return f"; did you mean {'.'.join(loc[:-1] + close)}?" if close else ""


def _format_error(source: str, raw: dict[str, Any], err: ValidationError) -> str:
    kinds = _kinds(raw)
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        if len(loc) > 1 and loc[0] in kinds and loc[1] == kinds[loc[0]]:
            loc.pop(1)  # the discriminator tag is not a key the user wrote
        note = ""
        if e["type"] == "extra_forbidden" and len(loc) == 2 and loc[0] in kinds:
            note = _kind_key_note(loc[0], loc[1], kinds[loc[0]])
        if e["type"] == "extra_forbidden" and not note:
            note = _suggestion(loc, kinds)
        msg = e["msg"]
        if e["type"] == "finite_number":
            msg = f"must be a finite number, got {e['input']!r} (inf and nan are refused)"
        lines.append(f"{source}: {'.'.join(loc) or '<root>'}: {msg}{note}")
    return "invalid config\n  " + "\n  ".join(lines)


def config_from_dict(raw: dict[str, Any], source: str = "<config>") -> Config:
    """Validate a raw mapping; errors list every bad key path, prefixed by ``source``."""
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(source, raw, err)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``--set`` overrides and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(read_utf8(path, "config file", ConfigError)) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return config_from_dict(apply_overrides(raw, overrides or []), source=str(path))


