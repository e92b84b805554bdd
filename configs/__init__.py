"""Settings: one typed object loaded from configs/*.yaml and ZHIWEN_* environment variables."""
from .settings import PROJECT_ROOT, Settings, SettingsError, load_settings

__all__ = ["PROJECT_ROOT", "Settings", "SettingsError", "load_settings"]
