//! `shoal passwd`: read a password and print its argon2 PHC string, for `password_argon2` in
//! `[[auth.users]]`. From a terminal it prompts without echo; otherwise it reads the first
//! line of standard input (`echo -n secret | shoal passwd`).

use std::io::{BufRead as _, IsTerminal as _, Write as _};

use anyhow::Context;

#[derive(clap::Args, Debug, Clone)]
pub struct PasswdArgs {}

/// The first line of standard input, without its line ending.
fn read_line() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).context("reading the password")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// Prompt on the terminal with echo off, restoring it afterwards.
fn prompt(what: &str) -> anyhow::Result<String> {
    use rustix::termios::{tcgetattr, tcsetattr, LocalModes, OptionalActions};
    let stdin = std::io::stdin();
    let saved = tcgetattr(&stdin).context("reading terminal settings")?;
    let mut quiet = saved.clone();
    quiet.local_modes.remove(LocalModes::ECHO);
    eprint!("{what}: ");
    std::io::stderr().flush()?;
    tcsetattr(&stdin, OptionalActions::Now, &quiet).context("turning echo off")?;
    let line = read_line();
    let _ = tcsetattr(&stdin, OptionalActions::Now, &saved);
    eprintln!();
    line
}

pub fn run(_: PasswdArgs) -> anyhow::Result<()> {
    let password = if std::io::stdin().is_terminal() {
        let first = prompt("Password")?;
        anyhow::ensure!(first == prompt("Again")?, "the passwords differ");
        first
    } else {
        read_line()?
    };
    anyhow::ensure!(!password.is_empty(), "empty password");
    println!("{}", shoal_registry::auth::hash_password(&password)?);
    Ok(())
}
