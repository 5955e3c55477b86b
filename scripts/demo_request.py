"""Send one chat request with an image to a running `dvd serve` through the official OpenAI client
and print the answer and the per-stage timings. Usage: python scripts/demo_request.py URL IMAGE"""

from __future__ import annotations

import base64
import sys

import openai


def main(base_url: str, image_path: str) -> int:
    client = openai.OpenAI(base_url=base_url, api_key="unused")
    model = client.models.list().data[0].id
    with open(image_path, "rb") as f:
        image = base64.b64encode(f.read()).decode()
    completion = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{image}"}},
            {"type": "text", "text": "Describe the image."},
        ]}],
        max_tokens=24,
        temperature=0,
    )
    print(f"answer ({model}): {completion.choices[0].message.content!r}")
    timings = completion.model_extra.get("dvd_timings", {})
    print("stage timings: " + "  ".join(f"{k[:-3]} {v:.1f} ms" for k, v in timings.items() if k.endswith("_ms")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
