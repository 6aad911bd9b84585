"""Show what the pipeline takes from one video: sampled frame indices, timestamps, native FPS, frame count, the
prompt text (and, with --tokenizer, the token count of exactly that prompt, the generation prompt's final
`<|im_start|>assistant\\n` included). Prints JSON; a bad file prints the reason and exits 2.

  python -m data_pipeline.inspect_video VIDEO [--question Q] [--num-frames 420] [--fps 1] [--template qwen2]
                                        [--tokenizer tokenizer.json]
"""

import argparse
import json
import sys

from data_pipeline.errors import BadSampleError


def inspect_video(path: str, *, question: str, num_frames: int | None, fps: float, template: str,
                  tokenizer_path: str | None, threads: int = 0) -> dict:
  from data_pipeline.prompt import render_conversation, tokenize_sample, video_prompt
  from data_pipeline.video import probe_video, read_video

  info = probe_video(path)
  clip = read_video(path, num_frames=num_frames, fps=fps, image_size=16, threads=threads)
  user = video_prompt(question, clip.timestamps)
  conversation = [{"from": "human", "value": user}, {"from": "gpt", "value": ""}]
  out = {
      "video": path,
      "native_fps": clip.native_fps,
      "frame_count": clip.frame_count,
      "codec": info.codec,
      "width": info.width,
      "height": info.height,
      "duration_s": round(info.duration_s, 3),
      "num_sampled": len(clip.indices),
      "indices": clip.indices,
      "timestamps": clip.timestamps,
      "prompt": render_conversation(conversation, template),
  }
  if tokenizer_path:
    from data_pipeline.tokenizer import load_tokenizer
    # The empty assistant turn renders as the role string the printed prompt ends with (`<|im_start|>assistant\n`).
    asked = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": ""}]
    tokens = tokenize_sample(asked, modality="video", tokenizer=load_tokenizer(tokenizer_path, template),
                             template=template, timestamps=clip.timestamps)
    ids = tokens["input_ids"]
    out["num_tokens"] = int(len(ids))
    out["num_placeholders"] = int((ids == -200).sum())
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m data_pipeline.inspect_video", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("video")
  ap.add_argument("--question", default="Describe the video.")
  ap.add_argument("--num-frames", type=int, default=420, help="frames to keep (0: every 1-fps frame)")
  ap.add_argument("--fps", type=float, default=1.0)
  ap.add_argument("--template", default="qwen2", choices=("qwen2", "llama3"))
  ap.add_argument("--tokenizer", default=None, help="local tokenizer.json for the token count")
  ap.add_argument("--threads", type=int, default=0)
  args = ap.parse_args(argv)
  try:
    out = inspect_video(args.video, question=args.question, num_frames=args.num_frames or None, fps=args.fps,
                        template=args.template, tokenizer_path=args.tokenizer, threads=args.threads)
  except BadSampleError as e:
    print(json.dumps({"video": args.video, "error": e.reason, "message": str(e)}), file=sys.stdout)
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(out, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
