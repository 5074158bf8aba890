"""Token conventions shared with LLaVA checkpoints, data and scripts."""

IGNORE_INDEX = -100  # label value the loss skips
IMAGE_TOKEN_INDEX = -200  # placeholder id for one image in input_ids; never embedded

DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_VIDEO_TOKEN = "<video>"  # a video's place in a conversation (the families that take videos)
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
IMAGE_PLACEHOLDER = "<image-placeholder>"
