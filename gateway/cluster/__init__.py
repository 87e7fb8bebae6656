"""Several gateway hosts sharing the devices: who owns a device (`membership`), and the
channel that carries datagrams to their owner and replies back (`peers`)."""
