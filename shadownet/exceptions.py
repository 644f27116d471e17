"""Every error ShadowNet raises on purpose, in one flat module (after ``cryptography.exceptions``).

Each class is named after what failed and carries only its message. At the trust boundary the
secure world fails opaquely: a tampered, truncated or foreign sealed file is one ``SecurityError``
whatever byte was wrong. ``tee_sim`` keeps GlobalPlatform's single ``TEEError`` (code + origin);
the runtime translates it into the classes below.

This module imports nothing, so every package (including ``converters``) may raise these.
"""


class ShadowNetError(Exception):
    """Base of every error ShadowNet raises on purpose."""


class ModelFormatError(ShadowNetError):
    """A model file is not a valid, supported float TFLite/Keras/SavedModel model."""


class UnsupportedOpError(ShadowNetError):
    """A model contains an op that ShadowNet cannot handle; the message names the op and the layer."""


class ArtifactError(ShadowNetError, ValueError):
    """A protected-artifact directory is missing, incomplete, malformed or of an unknown format version - or
    a file ``load`` was given to open with it is not what it must be (a delegate library that does not load):
    a ``ValueError``, as LiteRT's ``Interpreter`` raises for a model it cannot open and its
    ``load_delegate`` for a library it cannot load."""


class SecurityError(ShadowNetError, ValueError):
    """Sealed secrets, an attestation report or a paired model failed authentication: a ``ValueError``, as
    LiteRT's ``Interpreter`` raises for a model it cannot open (an app's fallback for a damaged model caught
    a truncated file but not a tampered one: a helper's probe)."""


class IntegrityError(ShadowNetError):
    """The accelerator returned a result that failed the secure world's verification."""


class InvokeError(ShadowNetError, RuntimeError):
    """An op of the model failed on this input in the secure world (a GATHER index out of range, say): a
    ``RuntimeError``, as LiteRT's ``invoke`` raises for the same input. The model stays usable."""


class DelegateError(ShadowNetError, RuntimeError):
    """A LiteRT delegate given for the accelerator could not be applied to its model: a ``RuntimeError``, as
    LiteRT's ``Interpreter`` raises for it (an app that falls back to the CPU on it works unchanged)."""


class InputError(ShadowNetError, ValueError):
    """An inference input has the wrong count, name, shape or dtype (or the zoo was asked for a model or
    training set it does not have)."""


class ClosedError(ShadowNetError):
    """A protected model or TEE session was used after it was closed."""


class TEECommunicationError(ShadowNetError):
    """The secure world crashed, hung or could not be reached."""


class SecureMemoryError(ShadowNetError):
    """The secure world's memory budget is too small for what was asked."""


class MaskPoolExhaustedError(ShadowNetError):
    """No unused one-time mask is left and the policy forbids refilling now."""


class TensorFlowMissingError(ShadowNetError):
    """The model zoo needs TensorFlow, which only the ``tf`` extra installs."""
