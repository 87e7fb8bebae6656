"""The MQTT side: a lean MQTT 3.1.1 client (`client`) and the publisher that drains the spool
through it (`publisher`)."""
