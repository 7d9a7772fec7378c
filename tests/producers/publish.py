#!/usr/bin/env python3
"""Publish one raw job message to an sdxl-worker jobs exchange with pika, the way a foreign
producer (any language, any AMQP client) does.

    publish.py --url amqp://guest:guest@127.0.0.1:5672/%2F --exchange sdxl.jobs \
               --body-file job.json [--message-id UUID] [--priority 0-9]

The body is sent byte for byte. Publisher confirms are on and the message is mandatory, so the
script exits non-zero unless the broker stored the message in a queue.
"""
import argparse
import sys

import pika


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--exchange", required=True)
    parser.add_argument("--body-file", required=True, help="file holding the message body ('-' for stdin)")
    parser.add_argument("--message-id")
    parser.add_argument("--priority", type=int)
    args = parser.parse_args()

    if args.body_file == "-":
        body = sys.stdin.buffer.read()
    else:
        with open(args.body_file, "rb") as f:
            body = f.read()

    properties = pika.BasicProperties(
        content_type="application/json",
        delivery_mode=pika.DeliveryMode.Persistent,
        message_id=args.message_id,
        priority=args.priority,
    )
    connection = pika.BlockingConnection(pika.URLParameters(args.url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        try:
            channel.basic_publish(
                exchange=args.exchange,
                routing_key="",
                body=body,
                properties=properties,
                mandatory=True,
            )
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as err:
            print(f"not stored by the broker: {err}", file=sys.stderr)
            return 1
    finally:
        connection.close()
    print("published")
    return 0


if __name__ == "__main__":
    sys.exit(main())
