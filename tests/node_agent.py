"""A second real node agent on this machine, against a running API (until `osless node join` lands):

    OSLESS_TOKEN=<node token> python -m tests.node_agent API_URL NODE_NAME DATA_DIR

The token is a `node` token named `node:NODE_NAME`, issued through the API. DATA_DIR/images must
hold the images (a link to the platform's: images across nodes are another slice's).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

from osless.client import AsyncApi
from osless.node import NodeAgent


async def main(api_url: str, name: str, data_dir: Path) -> None:
    api = AsyncApi(api_url, os.environ["OSLESS_TOKEN"])
    await NodeAgent(api, name=name, data_dir=data_dir).run()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(main(sys.argv[1], sys.argv[2], Path(sys.argv[3])))
