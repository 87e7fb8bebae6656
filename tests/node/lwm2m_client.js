// A real third-party LwM2M 1.0 client for tests/test_lwm2m_interop.py: npm's lwm2m-node-lib,
// driven by lines on stdin, telling what happens as JSON lines on stdout.
//   node lwm2m_client.js HOST PORT ENDPOINT [LOCATION]
// Without LOCATION it registers (POST /rd?ep=ENDPOINT&lt=300&lwm2m=1.0&b=U, from a port of
// its own, where it then serves the server's requests); with LOCATION (e.g. /rd/th-1) it
// only Updates that registration, from a new port: a device back with a new address.
// stdin: "set OBJECT_URI RESOURCE VALUE" (an observed resource notifies), "update", "quit".
'use strict';

const readline = require('readline');
const client = require('lwm2m-node-lib').client;

const [host, port, endpoint, location] = process.argv.slice(2);
let device = null;

function say(event) {
    process.stdout.write(JSON.stringify(event) + '\n');
}

function handlers(info) {
    client.setHandler(info.serverInfo, 'write', (objectType, objectId, resourceId, value, callback) => {
        say({event: 'write', path: `/${objectType}/${objectId}/${resourceId}`, value: String(value)});
        callback();
    });
    client.setHandler(info.serverInfo, 'execute', (objectType, objectId, resourceId, args, callback) => {
        say({event: 'execute', path: `/${objectType}/${objectId}/${resourceId}`, args: String(args || '')});
        callback();
    });
    client.setHandler(info.serverInfo, 'read', (objectType, objectId, resourceId, value, callback) => {
        say({event: 'read', path: `/${objectType}/${objectId}/${resourceId}`});
        callback(null, value);
    });
}

function registered(error, info) {
    if (error) {
        say({event: 'error', error: String(error)});
        process.exit(1);
    }
    device = info;
    handlers(info);
    say({event: location ? 'updated' : 'registered', location: info.location, port: info.localPort});
}

client.init({client: {lifetime: 300, version: '1.0', logLevel: 'FATAL', observe: {period: 3000},
                      ipProtocol: 'udp4', serverProtocol: 'udp4', port: 0},
             logLevel: 'FATAL'});
const objects = [['/3303/0', '5700', '21.5'], ['/3304/0', '5700', '40.5'], ['/1/0', '3', '60'],
                 ['/3/0', '4', '']];
let pending = objects.length;
for (const [uri, resource, value] of objects) {
    client.registry.create(uri, () => client.registry.setResource(uri, resource, value, () => {
        if (--pending > 0) {
            return;
        }
        if (location) {
            const info = {currentHost: host, currentPort: Number(port), location: location};
            client.update(info, (error) => registered(error, info));
        } else {
            client.register(host, Number(port), '/', endpoint, registered);
        }
    }));
}

readline.createInterface({input: process.stdin}).on('line', (line) => {
    const [command, uri, resource, value] = line.trim().split(' ');
    if (command === 'set') {
        client.registry.setResource(uri, resource, value, () => say({event: 'set', uri: uri}));
    } else if (command === 'update' && device) {
        client.update(device, (error) => say({event: error ? 'error' : 'updated',
                                              port: device.localPort, error: String(error || '')}));
    } else if (command === 'quit') {
        process.exit(0);
    }
}).on('close', () => process.exit(0));
