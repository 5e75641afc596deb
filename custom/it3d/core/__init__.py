from . import registry
from .base import (BaseBackground, BaseBuilder, BaseEstimator, BaseExporter, BaseGeometry, BaseGuidance, BaseLoss,
                   BaseMaterial, BaseModule, BaseObject, BasePromptProcessor, BaseRenderer, Configurable, Updateable,
                   build)
from .config import C, ConfigError, component, parse_structured, schedule, terms
from .errors import It3dError
from .registry import RegistryError, register
