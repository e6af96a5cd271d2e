//! DNS for tests: a small upstream resolver, and queries over UDP and TCP (hickory-proto's wire
//! format, as the proxy's).

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use hickory_proto::{
    op::{Message, ResponseCode},
    rr::{rdata::A, RData, Record, RecordType},
};

/// What the test upstream knows: `outside.example` is 10.250.0.9; `silent.example` gets no
/// answer at all; everything else is NXDOMAIN.
pub const OUTSIDE: &str = "outside.example.";
pub const OUTSIDE_IP: [u8; 4] = [10, 250, 0, 9];
pub const SILENT: &str = "silent.example.";

/// A resolver on `ip` (UDP and TCP, same port); counts the questions it got.
pub struct Upstream {
    pub addr: SocketAddr,
    pub questions: Arc<AtomicUsize>,
}

fn answer(query: &[u8]) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let question = q.queries.first()?.clone();
    let name = question.name().to_ascii().to_ascii_lowercase();
    if name == SILENT {
        return None;
    }
    let mut r = Message::response(q.metadata.id, q.metadata.op_code);
    r.metadata.recursion_desired = q.metadata.recursion_desired;
    r.metadata.recursion_available = true;
    r.add_query(question.clone());
    if name == OUTSIDE && question.query_type() == RecordType::A {
        r.add_answer(Record::from_rdata(
            question.name().clone(),
            60,
            RData::A(A(OUTSIDE_IP.into())),
        ));
    } else if name != OUTSIDE {
        r.metadata.response_code = ResponseCode::NXDomain;
    }
    r.to_vec().ok()
}

impl Upstream {
    /// On `ip:port` (0: any free port).
    pub fn start(ip: IpAddr, port: u16) -> Upstream {
        let udp = UdpSocket::bind((ip, port)).unwrap();
        let addr = udp.local_addr().unwrap();
        let tcp = TcpListener::bind(addr).unwrap();
        let questions = Arc::new(AtomicUsize::new(0));
        let n = questions.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok((len, peer)) = udp.recv_from(&mut buf) {
                n.fetch_add(1, Ordering::Relaxed);
                if let Some(r) = answer(&buf[..len]) {
                    let _ = udp.send_to(&r, peer);
                }
            }
        });
        let n = questions.clone();
        std::thread::spawn(move || {
            for mut c in tcp.incoming().map_while(Result::ok) {
                let n = n.clone();
                std::thread::spawn(move || {
                    while let Ok(q) = read_frame(&mut c) {
                        n.fetch_add(1, Ordering::Relaxed);
                        match answer(&q) {
                            Some(r) => {
                                if write_frame(&mut c, &r).is_err() {
                                    return;
                                }
                            }
                            None => return,
                        }
                    }
                });
            }
        });
        Upstream { addr, questions }
    }
}

fn read_frame(c: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    c.read_exact(&mut len)?;
    let mut m = vec![0u8; u16::from_be_bytes(len) as usize];
    c.read_exact(&mut m)?;
    Ok(m)
}

fn write_frame(c: &mut TcpStream, m: &[u8]) -> std::io::Result<()> {
    let mut out = (m.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(m);
    c.write_all(&out)
}

/// Send raw bytes over UDP from `sock` to `server`; the answer, if one comes within `wait`.
pub fn udp_raw(
    sock: &UdpSocket,
    server: SocketAddr,
    bytes: &[u8],
    wait: Duration,
) -> Option<Message> {
    sock.set_read_timeout(Some(wait)).unwrap();
    sock.send_to(bytes, server).unwrap();
    let mut buf = [0u8; 4096];
    let (n, _) = sock.recv_from(&mut buf).ok()?;
    Some(Message::from_vec(&buf[..n]).expect("the proxy's answer parses"))
}

/// One question over UDP (a fresh socket from `src`, or any address).
pub fn udp(server: SocketAddr, src: Option<IpAddr>, name: &str, ty: RecordType) -> Message {
    udp_try(server, src, name, ty)
        .unwrap_or_else(|| panic!("no UDP answer from {server} for {name}"))
}

/// One question over UDP; None when no answer comes within 10 s.
pub fn udp_try(
    server: SocketAddr,
    src: Option<IpAddr>,
    name: &str,
    ty: RecordType,
) -> Option<Message> {
    let bind = src.unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let sock = UdpSocket::bind((bind, 0)).unwrap();
    let q = zring_core::dns::query(0x4242, name, ty);
    let m = udp_raw(&sock, server, &q, Duration::from_secs(10))?;
    assert_eq!(m.metadata.id, 0x4242);
    Some(m)
}

/// One question over TCP.
pub fn tcp(server: SocketAddr, name: &str, ty: RecordType) -> Message {
    let mut c = TcpStream::connect_timeout(&server, Duration::from_secs(5)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write_frame(&mut c, &zring_core::dns::query(0x4343, name, ty)).unwrap();
    let m = Message::from_vec(&read_frame(&mut c).unwrap()).unwrap();
    assert_eq!(m.metadata.id, 0x4343);
    m
}

/// A TCP frame of raw bytes; the answer if one comes.
pub fn tcp_raw(server: SocketAddr, bytes: &[u8]) -> Option<Message> {
    let mut c = TcpStream::connect_timeout(&server, Duration::from_secs(5)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write_frame(&mut c, bytes).unwrap();
    read_frame(&mut c)
        .ok()
        .map(|b| Message::from_vec(&b).unwrap())
}

/// The answers as `name value` lines.
pub fn answers(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .map(|r| format!("{} {}", r.name, r.data))
        .collect()
}
