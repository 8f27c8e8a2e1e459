from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    DATA_TYPE_FLOAT32: _ClassVar[DataType]
    DATA_TYPE_FLOAT16: _ClassVar[DataType]
    DATA_TYPE_FLOAT64: _ClassVar[DataType]
    DATA_TYPE_UINT8: _ClassVar[DataType]
    DATA_TYPE_INT32: _ClassVar[DataType]
    DATA_TYPE_INT64: _ClassVar[DataType]
    DATA_TYPE_BOOL: _ClassVar[DataType]

class VersionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERSION_STATE_UNSPECIFIED: _ClassVar[VersionState]
    VERSION_STATE_LOADING: _ClassVar[VersionState]
    VERSION_STATE_READY: _ClassVar[VersionState]
    VERSION_STATE_FAILED: _ClassVar[VersionState]
    VERSION_STATE_UNLOADING: _ClassVar[VersionState]
DATA_TYPE_UNSPECIFIED: DataType
DATA_TYPE_FLOAT32: DataType
DATA_TYPE_FLOAT16: DataType
DATA_TYPE_FLOAT64: DataType
DATA_TYPE_UINT8: DataType
DATA_TYPE_INT32: DataType
DATA_TYPE_INT64: DataType
DATA_TYPE_BOOL: DataType
VERSION_STATE_UNSPECIFIED: VersionState
VERSION_STATE_LOADING: VersionState
VERSION_STATE_READY: VersionState
VERSION_STATE_FAILED: VersionState
VERSION_STATE_UNLOADING: VersionState

class Tensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("model", "inputs")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    model: ModelSpec
    inputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, model: _Optional[_Union[ModelSpec, _Mapping]] = ..., inputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("model", "outputs", "labels")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    model: ModelSpec
    outputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[_Union[ModelSpec, _Mapping]] = ..., outputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., labels: _Optional[_Iterable[str]] = ...) -> None: ...

class LayerRef(_message.Message):
    __slots__ = ("name", "index")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    name: str
    index: int
    def __init__(self, name: _Optional[str] = ..., index: _Optional[int] = ...) -> None: ...

class Objective(_message.Message):
    __slots__ = ("layer", "filter_indices", "weight")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    FILTER_INDICES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    layer: LayerRef
    filter_indices: _containers.RepeatedScalarFieldContainer[int]
    weight: float
    def __init__(self, layer: _Optional[_Union[LayerRef, _Mapping]] = ..., filter_indices: _Optional[_Iterable[int]] = ..., weight: _Optional[float] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("method", "objectives", "grad_modifiers", "keepdims", "normalize", "keep_activation", "output_dtype", "backprop_modifier", "wrt", "seed", "input", "output", "penultimate_layer", "samples", "noise", "steps", "baseline", "randomization", "chunk_size", "top_channels", "window", "stride", "occlusion_value", "blur_max_sigma", "blur_grad_step", "guided_fraction", "guided_max_dist", "xrai_scales", "xrai_sigma", "xrai_min_size", "xrai_dilation_radius", "xrai_area_threshold")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVES_FIELD_NUMBER: _ClassVar[int]
    GRAD_MODIFIERS_FIELD_NUMBER: _ClassVar[int]
    KEEPDIMS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    KEEP_ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    BACKPROP_MODIFIER_FIELD_NUMBER: _ClassVar[int]
    WRT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    PENULTIMATE_LAYER_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    RANDOMIZATION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOP_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    OCCLUSION_VALUE_FIELD_NUMBER: _ClassVar[int]
    BLUR_MAX_SIGMA_FIELD_NUMBER: _ClassVar[int]
    BLUR_GRAD_STEP_FIELD_NUMBER: _ClassVar[int]
    GUIDED_FRACTION_FIELD_NUMBER: _ClassVar[int]
    GUIDED_MAX_DIST_FIELD_NUMBER: _ClassVar[int]
    XRAI_SCALES_FIELD_NUMBER: _ClassVar[int]
    XRAI_SIGMA_FIELD_NUMBER: _ClassVar[int]
    XRAI_MIN_SIZE_FIELD_NUMBER: _ClassVar[int]
    XRAI_DILATION_RADIUS_FIELD_NUMBER: _ClassVar[int]
    XRAI_AREA_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    method: str
    objectives: _containers.RepeatedCompositeFieldContainer[Objective]
    grad_modifiers: _containers.RepeatedScalarFieldContainer[str]
    keepdims: bool
    normalize: bool
    keep_activation: bool
    output_dtype: DataType
    backprop_modifier: str
    wrt: LayerRef
    seed: int
    input: str
    output: str
    penultimate_layer: LayerRef
    samples: int
    noise: float
    steps: int
    baseline: Tensor
    randomization: Randomization
    chunk_size: int
    top_channels: int
    window: int
    stride: int
    occlusion_value: float
    blur_max_sigma: float
    blur_grad_step: float
    guided_fraction: float
    guided_max_dist: float
    xrai_scales: _containers.RepeatedScalarFieldContainer[float]
    xrai_sigma: float
    xrai_min_size: int
    xrai_dilation_radius: int
    xrai_area_threshold: float
    def __init__(self, method: _Optional[str] = ..., objectives: _Optional[_Iterable[_Union[Objective, _Mapping]]] = ..., grad_modifiers: _Optional[_Iterable[str]] = ..., keepdims: _Optional[bool] = ..., normalize: _Optional[bool] = ..., keep_activation: _Optional[bool] = ..., output_dtype: _Optional[_Union[DataType, str]] = ..., backprop_modifier: _Optional[str] = ..., wrt: _Optional[_Union[LayerRef, _Mapping]] = ..., seed: _Optional[int] = ..., input: _Optional[str] = ..., output: _Optional[str] = ..., penultimate_layer: _Optional[_Union[LayerRef, _Mapping]] = ..., samples: _Optional[int] = ..., noise: _Optional[float] = ..., steps: _Optional[int] = ..., baseline: _Optional[_Union[Tensor, _Mapping]] = ..., randomization: _Optional[_Union[Randomization, _Mapping]] = ..., chunk_size: _Optional[int] = ..., top_channels: _Optional[int] = ..., window: _Optional[int] = ..., stride: _Optional[int] = ..., occlusion_value: _Optional[float] = ..., blur_max_sigma: _Optional[float] = ..., blur_grad_step: _Optional[float] = ..., guided_fraction: _Optional[float] = ..., guided_max_dist: _Optional[float] = ..., xrai_scales: _Optional[_Iterable[float]] = ..., xrai_sigma: _Optional[float] = ..., xrai_min_size: _Optional[int] = ..., xrai_dilation_radius: _Optional[int] = ..., xrai_area_threshold: _Optional[float] = ...) -> None: ...

class Randomization(_message.Message):
    __slots__ = ("layers", "seed")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    layers: int
    seed: int
    def __init__(self, layers: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("model", "inputs", "explanation")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    model: ModelSpec
    inputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    explanation: Explanation
    def __init__(self, model: _Optional[_Union[ModelSpec, _Mapping]] = ..., inputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., explanation: _Optional[_Union[Explanation, _Mapping]] = ...) -> None: ...

class SaliencyMap(_message.Message):
    __slots__ = ("grad_modifier", "map")
    GRAD_MODIFIER_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    grad_modifier: str
    map: Tensor
    def __init__(self, grad_modifier: _Optional[str] = ..., map: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ResolvedObjective(_message.Message):
    __slots__ = ("layer_name", "layer_index", "filter_indices", "weight", "used_logits", "reduction")
    LAYER_NAME_FIELD_NUMBER: _ClassVar[int]
    LAYER_INDEX_FIELD_NUMBER: _ClassVar[int]
    FILTER_INDICES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    USED_LOGITS_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    layer_name: str
    layer_index: int
    filter_indices: _containers.RepeatedScalarFieldContainer[int]
    weight: float
    used_logits: bool
    reduction: str
    def __init__(self, layer_name: _Optional[str] = ..., layer_index: _Optional[int] = ..., filter_indices: _Optional[_Iterable[int]] = ..., weight: _Optional[float] = ..., used_logits: _Optional[bool] = ..., reduction: _Optional[str] = ...) -> None: ...

class ResolvedExplanation(_message.Message):
    __slots__ = ("method", "objectives", "grad_modifiers", "keepdims", "normalize", "output_dtype", "input", "channels_reduced", "seed", "backprop_modifier", "wrt", "penultimate_layer", "samples", "noise", "steps", "output", "randomized_layers", "randomization_seed", "chunk_size", "top_channels", "window", "stride", "occlusion_value", "blur_max_sigma", "blur_grad_step", "guided_fraction", "guided_max_dist", "xrai_scales", "xrai_sigma", "xrai_min_size", "xrai_dilation_radius", "xrai_area_threshold")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVES_FIELD_NUMBER: _ClassVar[int]
    GRAD_MODIFIERS_FIELD_NUMBER: _ClassVar[int]
    KEEPDIMS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_REDUCED_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    BACKPROP_MODIFIER_FIELD_NUMBER: _ClassVar[int]
    WRT_FIELD_NUMBER: _ClassVar[int]
    PENULTIMATE_LAYER_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    RANDOMIZED_LAYERS_FIELD_NUMBER: _ClassVar[int]
    RANDOMIZATION_SEED_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOP_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    OCCLUSION_VALUE_FIELD_NUMBER: _ClassVar[int]
    BLUR_MAX_SIGMA_FIELD_NUMBER: _ClassVar[int]
    BLUR_GRAD_STEP_FIELD_NUMBER: _ClassVar[int]
    GUIDED_FRACTION_FIELD_NUMBER: _ClassVar[int]
    GUIDED_MAX_DIST_FIELD_NUMBER: _ClassVar[int]
    XRAI_SCALES_FIELD_NUMBER: _ClassVar[int]
    XRAI_SIGMA_FIELD_NUMBER: _ClassVar[int]
    XRAI_MIN_SIZE_FIELD_NUMBER: _ClassVar[int]
    XRAI_DILATION_RADIUS_FIELD_NUMBER: _ClassVar[int]
    XRAI_AREA_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    method: str
    objectives: _containers.RepeatedCompositeFieldContainer[ResolvedObjective]
    grad_modifiers: _containers.RepeatedScalarFieldContainer[str]
    keepdims: bool
    normalize: bool
    output_dtype: DataType
    input: str
    channels_reduced: bool
    seed: int
    backprop_modifier: str
    wrt: str
    penultimate_layer: str
    samples: int
    noise: float
    steps: int
    output: str
    randomized_layers: _containers.RepeatedScalarFieldContainer[str]
    randomization_seed: int
    chunk_size: int
    top_channels: int
    window: int
    stride: int
    occlusion_value: float
    blur_max_sigma: float
    blur_grad_step: float
    guided_fraction: float
    guided_max_dist: float
    xrai_scales: _containers.RepeatedScalarFieldContainer[float]
    xrai_sigma: float
    xrai_min_size: int
    xrai_dilation_radius: int
    xrai_area_threshold: float
    def __init__(self, method: _Optional[str] = ..., objectives: _Optional[_Iterable[_Union[ResolvedObjective, _Mapping]]] = ..., grad_modifiers: _Optional[_Iterable[str]] = ..., keepdims: _Optional[bool] = ..., normalize: _Optional[bool] = ..., output_dtype: _Optional[_Union[DataType, str]] = ..., input: _Optional[str] = ..., channels_reduced: _Optional[bool] = ..., seed: _Optional[int] = ..., backprop_modifier: _Optional[str] = ..., wrt: _Optional[str] = ..., penultimate_layer: _Optional[str] = ..., samples: _Optional[int] = ..., noise: _Optional[float] = ..., steps: _Optional[int] = ..., output: _Optional[str] = ..., randomized_layers: _Optional[_Iterable[str]] = ..., randomization_seed: _Optional[int] = ..., chunk_size: _Optional[int] = ..., top_channels: _Optional[int] = ..., window: _Optional[int] = ..., stride: _Optional[int] = ..., occlusion_value: _Optional[float] = ..., blur_max_sigma: _Optional[float] = ..., blur_grad_step: _Optional[float] = ..., guided_fraction: _Optional[float] = ..., guided_max_dist: _Optional[float] = ..., xrai_scales: _Optional[_Iterable[float]] = ..., xrai_sigma: _Optional[float] = ..., xrai_min_size: _Optional[int] = ..., xrai_dilation_radius: _Optional[int] = ..., xrai_area_threshold: _Optional[float] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("model", "outputs", "maps", "resolved", "completeness_residual", "score_difference", "labels")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    MAPS_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_FIELD_NUMBER: _ClassVar[int]
    COMPLETENESS_RESIDUAL_FIELD_NUMBER: _ClassVar[int]
    SCORE_DIFFERENCE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    model: ModelSpec
    outputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    maps: _containers.RepeatedCompositeFieldContainer[SaliencyMap]
    resolved: ResolvedExplanation
    completeness_residual: Tensor
    score_difference: Tensor
    labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[_Union[ModelSpec, _Mapping]] = ..., outputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., maps: _Optional[_Iterable[_Union[SaliencyMap, _Mapping]]] = ..., resolved: _Optional[_Union[ResolvedExplanation, _Mapping]] = ..., completeness_residual: _Optional[_Union[Tensor, _Mapping]] = ..., score_difference: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Iterable[str]] = ...) -> None: ...

class ExplainStreamRequest(_message.Message):
    __slots__ = ("frame_id", "inputs", "model", "explanation", "window")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    frame_id: str
    inputs: _containers.RepeatedCompositeFieldContainer[Tensor]
    model: ModelSpec
    explanation: Explanation
    window: int
    def __init__(self, frame_id: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., explanation: _Optional[_Union[Explanation, _Mapping]] = ..., window: _Optional[int] = ...) -> None: ...

class ExplainStreamResponse(_message.Message):
    __slots__ = ("frame_id", "result")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    frame_id: str
    result: ExplainResponse
    def __init__(self, frame_id: _Optional[str] = ..., result: _Optional[_Union[ExplainResponse, _Mapping]] = ...) -> None: ...

class GetModelMetadataRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelSpec
    def __init__(self, model: _Optional[_Union[ModelSpec, _Mapping]] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "labels", "accepted_dtypes", "wire_range")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_DTYPES_FIELD_NUMBER: _ClassVar[int]
    WIRE_RANGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    labels: _containers.RepeatedScalarFieldContainer[str]
    accepted_dtypes: _containers.RepeatedScalarFieldContainer[DataType]
    wire_range: str
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., labels: _Optional[_Iterable[str]] = ..., accepted_dtypes: _Optional[_Iterable[_Union[DataType, str]]] = ..., wire_range: _Optional[str] = ...) -> None: ...

class LayerInfo(_message.Message):
    __slots__ = ("name", "index", "kind", "output_shape", "activation")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    name: str
    index: int
    kind: str
    output_shape: _containers.RepeatedScalarFieldContainer[int]
    activation: str
    def __init__(self, name: _Optional[str] = ..., index: _Optional[int] = ..., kind: _Optional[str] = ..., output_shape: _Optional[_Iterable[int]] = ..., activation: _Optional[str] = ...) -> None: ...

class ModelMetadata(_message.Message):
    __slots__ = ("name", "versions", "version", "inputs", "outputs", "layers", "methods", "grad_modifiers", "max_batch_size", "backprop_modifiers", "max_samples", "max_steps", "device", "version_status")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    GRAD_MODIFIERS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BACKPROP_MODIFIERS_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_STATUS_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: _containers.RepeatedScalarFieldContainer[int]
    version: int
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    layers: _containers.RepeatedCompositeFieldContainer[LayerInfo]
    methods: _containers.RepeatedScalarFieldContainer[str]
    grad_modifiers: _containers.RepeatedScalarFieldContainer[str]
    max_batch_size: int
    backprop_modifiers: _containers.RepeatedScalarFieldContainer[str]
    max_samples: int
    max_steps: int
    device: str
    version_status: _containers.RepeatedCompositeFieldContainer[VersionStatus]
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[_Iterable[int]] = ..., version: _Optional[int] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., layers: _Optional[_Iterable[_Union[LayerInfo, _Mapping]]] = ..., methods: _Optional[_Iterable[str]] = ..., grad_modifiers: _Optional[_Iterable[str]] = ..., max_batch_size: _Optional[int] = ..., backprop_modifiers: _Optional[_Iterable[str]] = ..., max_samples: _Optional[int] = ..., max_steps: _Optional[int] = ..., device: _Optional[str] = ..., version_status: _Optional[_Iterable[_Union[VersionStatus, _Mapping]]] = ...) -> None: ...

class VersionStatus(_message.Message):
    __slots__ = ("version", "state", "reason")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    version: int
    state: VersionState
    reason: str
    def __init__(self, version: _Optional[int] = ..., state: _Optional[_Union[VersionState, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelMetadata]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelMetadata, _Mapping]]] = ...) -> None: ...
