"""The one exception a bad sample raises; the loader skips the sample and counts it by `.reason`."""

REASONS = (
    "missing_file",       # path does not exist / cannot be opened
    "empty_file",         # zero bytes
    "corrupt",            # container or stream cannot be parsed / decoding failed
    "no_video_stream",    # e.g. an audio-only file
    "unsupported_codec",  # no decoder for the video stream's codec
    "zero_frames",        # the stream decodes to no frames at the sampled indices
    "too_few_frames",     # fewer than min_frames frames even after the fps+1 retry
    "bad_image",          # an image that cannot be decoded
    "bad_text",           # empty, non-UTF-8 or malformed conversation
    "bad_conversation",   # roles / <image> placeholders do not fit the modality
    # set by the builder (data_pipeline/jsonl_samples.py, media_files.py); the loader skips them the same way
    "bad_json",           # not a JSON object with a conversations list, or a field of the wrong type
    "bad_id",             # the id is not valid UTF-8
    "bad_clip",           # start_sec / end_sec not numbers >= 0, disagreeing, or end before start
    "bad_path",           # a media path with a NUL or an unencodable character
    "unknown_media_key",  # no video / video_id / image key, but a key that names media
    "unsupported_data_type",  # data_type other than "conversations"
    "outside_media_root",     # resolves outside --media-root
    "not_regular_file",   # FIFO, device, directory, socket, /proc or /sys file
    "symlink_loop",       # ELOOP while resolving the path
    "file_too_large",     # more than --max-media-bytes
    "unreadable_file",    # permissions or I/O error
    "bad_tsv",            # a TSV frame store row that does not match its index or is not base64 JPEGs
)


class BadSampleError(Exception):
  """A sample that cannot be used. `.reason` is one of REASONS; `.source` names the file or sample."""

  def __init__(self, reason: str, message: str, source: str | None = None):
    self.reason = reason
    self.source = source
    where = f"{source}: " if source else ""
    super().__init__(f"{where}{message} [{reason}]")
