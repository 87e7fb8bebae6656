"""nbiot-gateway: CoAP uplinks from NB-IoT sensors, validated, spooled durably, sent to MQTT."""

__version__ = "0.1.0"
