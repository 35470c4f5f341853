"""The one base class for problems the user fixes (a recipe key, a data file, a checkpoint, a run
folder). The CLI prints these as one paragraph and exits 2; anything else is a bug and keeps its
traceback. Every layer may import this module."""


class UserError(Exception):
    """A problem with the user's input. Messages name the file, key or line."""


class CheckpointError(UserError, ValueError):
    """A deployable checkpoint or export folder that is missing, incomplete, corrupted or of an unknown format."""


class SettingError(UserError, ValueError):
    """A runtime setting that cannot be used as given (the message names the setting)."""


class OutputFolderError(UserError, FileExistsError):
    """An output path that holds something ltp-compress did not write (a file, or a folder of other files): never replaced."""
