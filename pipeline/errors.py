"""Which exceptions are the user's to fix (printed as one paragraph) vs bugs (traceback)."""


def is_user_error(e: BaseException) -> bool:
    from ltp_compress.pipeline.data import DataError
    from ltp_compress.pipeline.models import ModelSourceError
    from ltp_compress.pipeline.recipe import RecipeError
    from ltp_compress.pipeline.runner import RunError

    user = (RecipeError, DataError, ModelSourceError, RunError, FileNotFoundError)
    try:
        from ltp_compress.modeling.deploy import CheckpointError

        user += (CheckpointError,)
    except ImportError:
        pass
    return isinstance(e, user)
