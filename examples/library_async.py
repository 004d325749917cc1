"""Keel in-process, from async code: the same pipeline the gateway runs, without a network hop.

    python examples/library_async.py
"""

import asyncio
from pathlib import Path

from keel import Keel

CONFIG = Path(__file__).with_name("simulated.yaml")


async def main() -> None:
    async with Keel.from_config(CONFIG) as keel:  # starts providers; closes them at the end
        reply = await keel.chat(model="sim", messages=[{"role": "user", "content": "hello"}])
        print(reply.choices[0].message.content)  # echo: hello

        chunks = await keel.chat(model="sim", messages=[{"role": "user", "content": "hello again"}], stream=True)
        async for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print()


asyncio.run(main())
