"""Only the two known-noise library warnings are dropped, and only from their own loggers."""

import logging

import stages.models  # noqa: F401  (installs the filters)
from stages.models.quiet import SubstringFilter, install


def _passes(logger_name: str, message: str) -> bool:
    logger = logging.getLogger(logger_name)
    record = logger.makeRecord(logger_name, logging.WARNING, __file__, 1, message, None, None)
    return bool(logger.filter(record))


def test_known_noise_is_dropped_and_everything_else_kept():
    fallback = "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` ..."
    assert not _passes("transformers.utils.import_utils", fallback)
    assert not _passes("diffusers.models.modeling_utils", "There are modules in UNet2DConditionModel that should be kept in float32: []. Casting ...")
    # a non-empty list of fp32 modules is a real warning
    assert _passes("diffusers.models.modeling_utils", "There are modules in X that should be kept in float32: ['norm']. Casting ...")
    assert _passes("transformers.utils.import_utils", "Could not import module 'CLIPModel'")
    assert _passes("transformers.modeling_utils", fallback)  # another logger is untouched


def test_install_is_idempotent():
    install()
    install()
    ours = [f for f in logging.getLogger("transformers.utils.import_utils").filters if isinstance(f, SubstringFilter)]
    assert len(ours) == 1
