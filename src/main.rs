use clap::Parser;
use kvgate::cli::{self, Cli, Command};
use std::error::Error;
use std::process::ExitCode;

/// The error and its causes on one line, `outer: inner: ...`: each layer
/// names what failed (file, address, flag), the innermost says why.
fn chain(e: &dyn Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn main() -> ExitCode {
    let args = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kvgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<(), Box<dyn Error>> = match args.command {
        // The same resolution (environment token included) and the same
        // checks as a start, short of binding.
        Some(Command::CheckConfig { config }) => {
            let args = cli::RunArgs {
                config: Some(config.clone()),
                ..Default::default()
            };
            match args.resolve() {
                Ok(cfg) => match cli::check(&cfg) {
                    Ok(()) => {
                        println!("{}: ok", config.display());
                        Ok(())
                    }
                    Err(e) => Err(e.into()),
                },
                Err(e) => Err(e.into()),
            }
        }
        Some(Command::Health { admin }) => cli::health(&admin).map_err(Into::into),
        Some(Command::Demo { listen }) => runtime
            .block_on(kvgate::demo::run(&listen))
            .map_err(Into::into),
        None => match args.run.resolve() {
            Ok(cfg) => match cli::check(&cfg) {
                Ok(()) => {
                    cli::init_logs(&cfg.log);
                    runtime.block_on(cli::run(cfg)).map_err(Into::into)
                }
                Err(e) => Err(e.into()),
            },
            Err(e) => Err(e.into()),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvgate: {}", chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
