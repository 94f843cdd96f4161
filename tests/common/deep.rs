//! Publishing a message whose headers nest field arrays as deep as one
//! frame allows (about 26,000 levels in RabbitMQ's default 128 KiB frame),
//! over a hand-written AMQP connection. lapin's encoder recurses once per
//! nesting level, so publishing these headers through lapin would overflow
//! the publishing thread's stack; its parser is bounded (see
//! `patches/amq-protocol-types`), which is what the tests using this check.

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// The header that nests; its value is the only deep one.
pub const KEY: &str = "x-deep";
/// AMQP 0-9-1 frame overhead: type, channel, size and the end octet.
const FRAME_OVERHEAD: usize = 8;

/// The content-header frame payload (class basic) carrying `message_id`,
/// persistent delivery and a header [`KEY`] of field arrays nested as
/// deep as fits in a frame of `frame_max` bytes: (payload, depth).
pub fn content_header(frame_max: usize, message_id: &str, body_len: usize) -> (Vec<u8>, usize) {
    // class, weight, body size, property flags; the headers table
    // (length, key, value); delivery mode; message id.
    let fixed = 2 + 2 + 8 + 2 + 4 + 1 + KEY.len() + 1 + 1 + message_id.len();
    // Each level is an array ('A' and a 4-byte length) holding the next;
    // the innermost is empty.
    let depth = (frame_max - FRAME_OVERHEAD - fixed) / 5;
    let mut payload = Vec::with_capacity(fixed + 5 * depth);
    payload.extend_from_slice(&60u16.to_be_bytes());
    payload.extend_from_slice(&0u16.to_be_bytes());
    payload.extend_from_slice(&(body_len as u64).to_be_bytes());
    // headers (bit 13), delivery-mode (12), message-id (7)
    payload.extend_from_slice(&0x3080u16.to_be_bytes());
    let table_len = 1 + KEY.len() + 5 * depth;
    payload.extend_from_slice(&(table_len as u32).to_be_bytes());
    short_string(&mut payload, KEY);
    for level in 0..depth {
        payload.push(b'A');
        let inner = 5 * (depth - level - 1);
        payload.extend_from_slice(&(inner as u32).to_be_bytes());
    }
    payload.push(2);
    short_string(&mut payload, message_id);
    assert_eq!(payload.len(), fixed + 5 * depth);
    assert!(payload.len() + FRAME_OVERHEAD <= frame_max);
    assert!(
        payload.len() + FRAME_OVERHEAD + 5 > frame_max,
        "one level more fits"
    );
    (payload, depth)
}

fn short_string(buf: &mut Vec<u8>, s: &str) {
    buf.push(u8::try_from(s.len()).expect("a short string"));
    buf.extend_from_slice(s.as_bytes());
}

fn long_string(buf: &mut Vec<u8>, s: &[u8]) {
    buf.extend_from_slice(&(s.len() as u32).to_be_bytes());
    buf.extend_from_slice(s);
}

fn method(class: u16, method: u16, args: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(4 + args.len());
    payload.extend_from_slice(&class.to_be_bytes());
    payload.extend_from_slice(&method.to_be_bytes());
    payload.extend_from_slice(args);
    payload
}

async fn send(stream: &mut TcpStream, kind: u8, channel: u16, payload: &[u8]) {
    let mut frame = Vec::with_capacity(payload.len() + FRAME_OVERHEAD);
    frame.push(kind);
    frame.extend_from_slice(&channel.to_be_bytes());
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    frame.push(0xCE);
    stream.write_all(&frame).await.expect("write a frame");
}

/// The next method frame's (class, method, arguments); heartbeats are
/// skipped, a connection or channel close panics with its reply text.
async fn next_method(stream: &mut TcpStream) -> (u16, u16, Vec<u8>) {
    loop {
        let mut head = [0u8; 7];
        stream.read_exact(&mut head).await.expect("read a frame");
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        let mut payload = vec![0u8; size + 1];
        stream.read_exact(&mut payload).await.expect("read a frame");
        assert_eq!(payload.pop(), Some(0xCE), "frame end");
        if head[0] != 1 {
            continue;
        }
        let class = u16::from_be_bytes([payload[0], payload[1]]);
        let id = u16::from_be_bytes([payload[2], payload[3]]);
        if (class, id) == (10, 50) || (class, id) == (20, 40) {
            let text_len = payload[6] as usize;
            panic!(
                "the broker closed the {}: {} {}",
                if class == 10 { "connection" } else { "channel" },
                u16::from_be_bytes([payload[4], payload[5]]),
                String::from_utf8_lossy(&payload[7..7 + text_len])
            );
        }
        return (class, id, payload[4..].to_vec());
    }
}

async fn expect(stream: &mut TcpStream, class: u16, id: u16) -> Vec<u8> {
    let (c, m, args) = next_method(stream).await;
    assert_eq!((c, m), (class, id), "unexpected method from the broker");
    args
}

/// Publishes `body` to `exchange` with `routing_key` (mandatory, in
/// confirm mode) under the deepest headers the broker's `frame_max`
/// allows, and waits for the confirm. Returns (depth, frame_max).
pub async fn publish(
    url: &str,
    exchange: &str,
    routing_key: &str,
    message_id: &str,
    body: &[u8],
) -> (usize, usize) {
    let uri: lapin::uri::AMQPUri = url.parse().expect("AMQP_URL parses");
    assert_eq!(
        uri.scheme,
        lapin::uri::AMQPScheme::AMQP,
        "the hand-written publisher speaks plain AMQP only"
    );
    let mut stream = TcpStream::connect((uri.authority.host.as_str(), uri.authority.port))
        .await
        .expect("connect to the broker");
    stream
        .write_all(b"AMQP\x00\x00\x09\x01")
        .await
        .expect("protocol header");
    expect(&mut stream, 10, 10).await; // connection.start
    let mut args = 0u32.to_be_bytes().to_vec(); // no client properties
    short_string(&mut args, "PLAIN");
    let user = &uri.authority.userinfo;
    long_string(
        &mut args,
        format!("\0{}\0{}", user.username, user.password).as_bytes(),
    );
    short_string(&mut args, "en_US");
    send(&mut stream, 1, 0, &method(10, 11, &args)).await;
    let tune = expect(&mut stream, 10, 30).await;
    let frame_max = u32::from_be_bytes([tune[2], tune[3], tune[4], tune[5]]);
    assert_ne!(frame_max, 0, "the broker limits frames");
    let mut args = tune[..6].to_vec(); // its channel_max and frame_max
    args.extend_from_slice(&0u16.to_be_bytes()); // no heartbeats
    send(&mut stream, 1, 0, &method(10, 31, &args)).await;
    let mut args = Vec::new();
    short_string(&mut args, &uri.vhost);
    short_string(&mut args, "");
    args.push(0);
    send(&mut stream, 1, 0, &method(10, 40, &args)).await;
    expect(&mut stream, 10, 41).await;
    send(&mut stream, 1, 1, &method(20, 10, &[0])).await;
    expect(&mut stream, 20, 11).await;
    send(&mut stream, 1, 1, &method(85, 10, &[0])).await;
    expect(&mut stream, 85, 11).await;

    let mut args = 0u16.to_be_bytes().to_vec();
    short_string(&mut args, exchange);
    short_string(&mut args, routing_key);
    args.push(1); // mandatory: an unroutable message comes back
    send(&mut stream, 1, 1, &method(60, 40, &args)).await;
    let (header, depth) = content_header(frame_max as usize, message_id, body.len());
    send(&mut stream, 2, 1, &header).await;
    send(&mut stream, 3, 1, body).await;
    let (class, id, _) = next_method(&mut stream).await;
    assert_eq!(
        (class, id),
        (60, 80),
        "basic.ack for the deep message (60,50 is basic.return: unroutable; 60,120 a nack)"
    );

    let mut args = 200u16.to_be_bytes().to_vec();
    short_string(&mut args, "done");
    args.extend_from_slice(&[0, 0, 0, 0]);
    send(&mut stream, 1, 0, &method(10, 50, &args)).await;
    expect(&mut stream, 10, 51).await;
    (depth, frame_max as usize)
}
