//! Weft's kernel datapath. One module per hook; entry points are thin and turn every error into
//! "let the traffic through" — a fast-path miss must never drop traffic.
#![no_std]
#![no_main]

mod connect;
mod events;
mod maps;
mod sk_msg;
mod sockops;
mod stats;
mod tc;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// sockmap, sk_msg redirect and cgroup helpers require a GPL-compatible license.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
