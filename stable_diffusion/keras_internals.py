"""Every use of a private Keras or keras-hub API, each with the public fallback taken where this
Keras or keras-hub lacks it; the rest of the package uses public APIs only.

- Creating variables from checkpoint arrays (`created_from`, `set_variable`): Keras' registry of
  variables a `StatelessScope` left without a value (`keras.src.backend.common.global_state`) and the
  private `Variable._value`, `_initialize` and `_convert_to_tensor`. Fallback: the models are built
  with random values and every variable is then assigned with `Variable.assign`, which costs the
  random initialization and a copy of every weight.
- `CLIPBytePairTokenizer`: overrides keras-hub's private `_set_vocabulary_and_merges_tf` and
  `_maybe_initialized_tf` to build the TensorFlow lookup tables on first use. Fallback: keras-hub's
  `CLIPTokenizer` as it is, which builds them with every tokenizer.
- `openvino_graph`: a model called on the OpenVINO backend's private `OpenVINOKerasTensor`, as Keras'
  OpenVINO trainer does, to get its OpenVINO graph. Fallback: none (`runtime.py` then keeps Keras'
  own `predict_on_batch`).
- Importing keras-hub (`import_keras_hub`): on backends other than TensorFlow, as where TensorFlow is not
  installed, which keras-hub 0.32 reads from an ImportError (`keras_hub.src.utils.tensor_utils`). Fallback: a
  keras-hub that fails to import so is imported again with TensorFlow.
- Quantizing (`garbage_collected_once`): Keras' `Layer.__delattr__` runs a full `gc.collect()` each time a
  layer drops a variable, as `Dense.quantize` drops its float kernel. No fallback needed: without the
  block, quantizing is as correct, only slower.
"""
import contextlib
import gc
import sys

import keras


def import_keras_hub():
    """keras-hub; on backends other than TensorFlow imported as where TensorFlow is not installed, unless keras-hub
    or TensorFlow is loaded already. keras-hub imports TensorFlow and tensorflow-text when it finds them (4 s of
    2 CPU cores, `benchmarks/RESULTS.md`) for its `tf.data` paths, which prompts never take: the tokenizer runs on
    its pure-Python path either way. Such a keras-hub treats TensorFlow as absent for the rest of the process
    (import keras_hub first to keep its `tf.data` paths); `import tensorflow` itself still works."""
    if not (keras.backend.backend() == "tensorflow" or "keras_hub" in sys.modules or "tensorflow" in sys.modules):
        blocked = ("tensorflow", "tensorflow_text")
        sys.modules.update(dict.fromkeys(blocked))  # `import` raises ImportError on a None entry (Python's import)
        try:
            import keras_hub
        except ImportError:  # a keras-hub that needs TensorFlow: the parts it imported go; imported with it below
            for name in [name for name in sys.modules if name.split(".")[0] == "keras_hub"]:
                del sys.modules[name]
        finally:
            for name in blocked:
                del sys.modules[name]
    import keras_hub

    return keras_hub


keras_hub = import_keras_hub()

try:  # private: the registry of variables a StatelessScope created without a value
    from keras.src.backend.common import global_state
except ImportError:
    global_state = None

VARIABLE_METHODS = ("_initialize", "_convert_to_tensor")  # private methods of keras.Variable
TOKENIZER_METHODS = ("_set_vocabulary_and_merges_tf", "_maybe_initialized_tf")  # private in keras-hub


def defers_initialization():
    """Whether this Keras has the private parts `created_from` and `set_variable` create variables with."""
    return global_state is not None and all(hasattr(keras.Variable, name) for name in VARIABLE_METHODS)


@contextlib.contextmanager
def created_from(checkpoint, sd):
    """For `StableDiffusion.__init__`: the models built in this block take their weights from
    `checkpoint` when it ends. Inside, Keras' deferred initialization (a StatelessScope) leaves each
    variable without a value; loading then creates it from its tensor, where random initialization
    would cost more than the loading and zeros then an assignment a second copy."""
    if not defers_initialization():  # public: random values, then assigned
        yield
        checkpoint.load_into(sd)
        return
    waiting = list(global_state.get_global_attribute("uninitialized_variables") or [])
    try:
        with keras.StatelessScope(initialize_variables=False):
            yield
        checkpoint.load_into(sd)
    finally:  # Keras would initialize the variables it lists as waiting when a later scope closes
        global_state.set_global_attribute("uninitialized_variables", waiting)


def set_variable(variable, value):
    """Assigns the numpy array `value`; a variable still waiting for its first value (see `created_from`)
    is created from it instead. On TensorFlow, an aligned array of the variable's dtype becomes the
    variable's memory (DLPack) rather than being copied (`convert_to_tensor` copies a numpy array twice):
    the caller hands it over. DLPack takes numpy's own dtypes only, not ml_dtypes' bfloat16."""
    if not defers_initialization() or variable._value is not None:  # public: assign
        variable.assign(value)
    elif (keras.backend.backend() == "tensorflow" and value.dtype == variable.dtype and value.dtype.kind in "biuf"
          and value.flags.c_contiguous and value.ctypes.data % 64 == 0):
        import tensorflow as tf

        variable._initialize(tf.experimental.dlpack.from_dlpack(value.__dlpack__()))
    else:
        variable._initialize(variable._convert_to_tensor(value, dtype=variable.dtype))


@contextlib.contextmanager
def garbage_collected_once():
    """Within the block, `gc.collect()` does nothing; it runs once at the end. Keras' `Layer.__delattr__`
    (private behaviour) collects after every variable a layer drops: in a process holding TensorFlow a
    fraction of a second each, minutes for the ~300 Dense layers `quantization.py` quantizes in SD 1.5."""
    collect = gc.collect
    gc.collect = lambda generation=2: 0
    try:
        yield
    finally:
        gc.collect = collect
        gc.collect()


class CLIPBytePairTokenizer(keras_hub.models.CLIPTokenizer):
    """keras-hub's CLIPTokenizer, its TensorFlow lookup tables built on first use of its TensorFlow
    path (a `tf.data` or `tf.function` trace) rather than up front: prompts take the Python path, which
    never reads them. keras-hub 0.32 builds them in `set_vocabulary_and_merges`, where they also set the
    `self.vocabulary` its Python path reads (absent without TensorFlow)."""

    def _set_vocabulary_and_merges_tf(self, vocabulary, merges):  # private: keras-hub's, deferred
        self.vocabulary, self.merges, self.cache = dict(vocabulary), list(merges), None

    def _maybe_initialized_tf(self):  # private: keras-hub's, building what the method above deferred
        if self.cache is None:
            import tensorflow as tf

            with tf.init_scope():  # eager tables, outliving the graph being traced
                super()._set_vocabulary_and_merges_tf(self.vocabulary, self.merges)


def clip_tokenizer(vocabulary, merges):
    """A `CLIPBytePairTokenizer`, or keras-hub's CLIPTokenizer where keras-hub lacks the private
    methods that one overrides."""
    if all(hasattr(keras_hub.models.CLIPTokenizer, name) for name in TOKENIZER_METHODS):
        return CLIPBytePairTokenizer(vocabulary, merges)
    return keras_hub.models.CLIPTokenizer(vocabulary, merges)  # public


def openvino_graph(model, inputs):
    """The `openvino.Model` of `model` (OpenVINO backend) on parameters of the shapes and dtypes of the
    numpy arrays `inputs` (one per model input), or None where this Keras lacks the class it needs. bfloat16
    outputs (mixed_bfloat16 policies) are converted to float32: OpenVINO's Python API hands bf16 results out as
    float16 arrays of the same bytes (keras-team/keras#22567)."""
    try:  # private: the symbolic tensor of Keras' OpenVINO backend
        from keras.src.backend.openvino.core import OpenVINOKerasTensor
    except ImportError:
        return None
    import openvino
    from openvino import opset16

    parameters = [opset16.parameter(x.shape, openvino.Type(x.dtype)) for x in inputs]
    tensors = [OpenVINOKerasTensor(parameter.output(0)) for parameter in parameters]
    outputs = model(tensors if len(tensors) > 1 else tensors[0])
    outputs = [output.output for output in keras.tree.flatten(outputs)]
    outputs = [opset16.convert(x, "f32") if x.get_element_type() == openvino.Type.bf16 else x for x in outputs]
    return openvino.Model([opset16.result(output) for output in outputs], parameters)
