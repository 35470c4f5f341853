"""The default length limit of a tokenised input (tokens per sequence, special tokens included).
The one owner of the number: the data config (tasks/data.py), the deployable checkpoint's and the
ONNX export's description files (a file without the key) and the runtimes derive it from here.
Every layer may import this module."""

#: truncation length when a recipe, a checkpoint's ltp.json or an export's ltp_onnx.json names none
DEFAULT_MAX_SEQ_LENGTH = 128
