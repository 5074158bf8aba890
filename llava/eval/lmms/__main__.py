"""`python -m llava.eval.lmms`: the folder of the tiny world's lmms-eval tasks, for `--include_path`."""

from llava.eval.lmms import TASKS_DIR

print(TASKS_DIR)
