//! The control-file protocol: one command per line, written to
//! `MOUNTPOINT/control`; a read on the same handle returns the reply to that
//! handle's last command as `key=value` lines.
//!
//! Commands: `merge SOURCE DESTINATION [keep] [force]`, `cancel JOB`, `help`.
//! Words are separated by blanks; a word with blanks is written in double
//! quotes (`"my disk"`), with `\"` and `\\` escapes inside.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result, RC_COMPLETED, RC_INVALID_PARAMETER};

/// One control command. Parsing and printing round-trip, quotes included:
///
/// ```
/// use chainfs::control::Command;
/// let c: Command = r#"merge "my leaf" base keep"#.parse().unwrap();
/// assert_eq!(
///     c,
///     Command::Merge {
///         source: "my leaf".into(),
///         destination: "base".into(),
///         keep: true,
///         force: false,
///     }
/// );
/// assert_eq!(c.to_string().parse::<Command>().unwrap(), c);
/// assert_eq!("cancel 7".parse::<Command>().unwrap(), Command::Cancel { job: 7 });
/// assert!("merge only-one-path".parse::<Command>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Merge {
        source: String,
        destination: String,
        keep: bool,
        force: bool,
    },
    Cancel {
        job: u64,
    },
    Help,
}

/// Split a line into words, honouring double quotes.
pub fn split_words(line: &str) -> Result<Vec<String>> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            '\\' if quoted => match chars.next() {
                Some(n) => cur.push(n),
                None => return Err(Error::invalid("a backslash ends the line")),
            },
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if quoted {
        return Err(Error::invalid("unterminated quote"));
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

impl FromStr for Command {
    type Err = Error;

    fn from_str(line: &str) -> Result<Command> {
        let words = split_words(line)?;
        let Some((verb, args)) = words.split_first() else {
            return Err(Error::invalid("empty command (try `help`)"));
        };
        match verb.as_str() {
            "help" if args.is_empty() => Ok(Command::Help),
            "cancel" => match args {
                [job] => {
                    let n = job.trim_start_matches("jobs/");
                    n.parse()
                        .map(|job| Command::Cancel { job })
                        .map_err(|_| Error::invalid(format!("`{job}` is not a job number")))
                }
                _ => Err(Error::invalid("usage: cancel JOB")),
            },
            "merge" => {
                if args.len() < 2 {
                    return Err(Error::invalid(
                        "usage: merge SOURCE DESTINATION [keep] [force]",
                    ));
                }
                let (mut keep, mut force) = (false, false);
                for flag in &args[2..] {
                    match flag.as_str() {
                        "keep" => keep = true,
                        "force" => force = true,
                        f => return Err(Error::invalid(format!("unknown merge flag `{f}`"))),
                    }
                }
                Ok(Command::Merge {
                    source: args[0].clone(),
                    destination: args[1].clone(),
                    keep,
                    force,
                })
            }
            v => Err(Error::invalid(format!(
                "unknown command `{v}` (commands: merge, cancel, help)"
            ))),
        }
    }
}

fn quote(s: &str) -> String {
    if !s.is_empty() && !s.contains(|c: char| c.is_whitespace() || c == '"' || c == '\\') {
        return s.to_string();
    }
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Merge {
                source,
                destination,
                keep,
                force,
            } => {
                write!(f, "merge {} {}", quote(source), quote(destination))?;
                if *keep {
                    f.write_str(" keep")?;
                }
                if *force {
                    f.write_str(" force")?;
                }
                Ok(())
            }
            Command::Cancel { job } => write!(f, "cancel {job}"),
            Command::Help => f.write_str("help"),
        }
    }
}

pub const HELP: &str = "\
Commands (one per line, written to this file):
  merge SOURCE DESTINATION [keep] [force]
  cancel JOB
  help
SOURCE and DESTINATION are paths or the file names shown in `chain`;
quote names with blanks: merge \"my disk\" base
A read on the same open file returns the reply to its last command.
";

/// The reply to a command, as read back from the control file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub return_value: u32,
    pub fields: Vec<(String, String)>,
}

impl Reply {
    pub fn ok(fields: Vec<(String, String)>) -> Reply {
        Reply {
            return_value: RC_COMPLETED,
            fields,
        }
    }

    pub fn refused(e: &Error) -> Reply {
        Reply {
            return_value: e.return_code(),
            fields: vec![("ErrorDescription".into(), e.to_string().replace('\n', " "))],
        }
    }

    pub fn invalid(msg: &str) -> Reply {
        Reply {
            return_value: RC_INVALID_PARAMETER,
            fields: vec![("ErrorDescription".into(), msg.to_string())],
        }
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "ReturnValue={}", self.return_value)?;
        for (k, v) in &self.fields {
            writeln!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        for line in [
            "merge a b",
            "merge \"my disk\" /x/base keep force",
            "cancel 7",
            "help",
        ] {
            let c: Command = line.parse().unwrap();
            assert_eq!(c.to_string().parse::<Command>().unwrap(), c);
        }
        assert_eq!(
            "merge \"a b\" c".parse::<Command>().unwrap(),
            Command::Merge {
                source: "a b".into(),
                destination: "c".into(),
                keep: false,
                force: false
            }
        );
        assert_eq!(
            "cancel jobs/3".parse::<Command>().unwrap(),
            Command::Cancel { job: 3 }
        );
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "merge a",
            "merge a b sideways",
            "cancel x",
            "frobnicate",
            "merge \"a b",
        ] {
            assert!(bad.parse::<Command>().is_err(), "{bad:?}");
        }
    }
}
