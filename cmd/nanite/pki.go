package main

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/nanite-go/nanite/security"
)

// NewCmdPKI returns "nanite pki" with its subcommands.
func NewCmdPKI(f *Factory) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "pki <command>",
		Short: "Create a CA, issue certificates and show what a file holds",
		Long: `Manage the certificates of secure mode (see docs/security.md):

  nanite pki init --dir DIR                          the application's CA: DIR/ca.crt, DIR/ca.key
  nanite pki issue NAME --role ROLE --ca-dir DIR     an identity: NAME.crt, NAME.key
  nanite pki show FILE...                            what a certificate says

Every agent, mapper, bridge and client has its own certificate, issued by
the CA, which binds its name, its role (agent, mapper, bridge or client)
and its public keys (Ed25519 for signatures, HPKE for sealed payloads).
Key files are written with mode 0600 and never printed. Give the CA's
certificate (ca.crt) to every participant (--ca) and keep ca.key offline.`,
		Example: `  nanite pki init --dir ./pki/ca --name shop-ca
  nanite pki issue web-1 --role agent --ca-dir ./pki/ca --out-dir ./pki
  nanite pki issue ops --role client --ca-dir ./pki/ca --out-dir ~/.config/nanite
  nanite pki show ./pki/web-1.crt
  nanite agent --cert ./pki/web-1.crt --key ./pki/web-1.key --ca ./pki/ca/ca.crt --policy policy.yaml`,
		Args: args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	cmd.AddCommand(newCmdPKIInit(f), newCmdPKIIssue(f), newCmdPKIShow(f))
	return cmd
}

// parseValidity reads a validity period: "10y" (years of 365 days),
// "90d", or a Go duration ("720h").
func parseValidity(s string) (time.Duration, error) {
	var d time.Duration
	if n, ok := strings.CutSuffix(s, "y"); ok {
		v, err := strconv.Atoi(n)
		if err != nil {
			return 0, usageErrorf("validity %q: want a number of years (10y), days (90d) or a duration (720h)", s)
		}
		d = time.Duration(v) * 365 * 24 * time.Hour
	} else if n, ok := strings.CutSuffix(s, "d"); ok {
		v, err := strconv.Atoi(n)
		if err != nil {
			return 0, usageErrorf("validity %q: want a number of years (10y), days (90d) or a duration (720h)", s)
		}
		d = time.Duration(v) * 24 * time.Hour
	} else {
		v, err := time.ParseDuration(s)
		if err != nil {
			return 0, usageErrorf("validity %q: want a number of years (10y), days (90d) or a duration (720h)", s)
		}
		d = v
	}
	if d <= 0 || d > 100*365*24*time.Hour {
		return 0, usageErrorf("validity %q: must be positive and at most 100y", s)
	}
	return d, nil
}

// exists reports whether path exists (an error other than "does not
// exist" counts as existing, so that nothing is overwritten by mistake).
func exists(path string) bool {
	_, err := os.Lstat(path)
	return !errors.Is(err, fs.ErrNotExist)
}

func newCmdPKIInit(f *Factory) *cobra.Command {
	var dir, name, validity string
	cmd := &cobra.Command{
		Use:   "init --dir DIR [flags]",
		Short: "Create the application's CA",
		Long: `Create a certificate authority: an Ed25519 key and a self-signed certificate,
written to DIR/ca.crt (0644) and DIR/ca.key (0600); DIR is created with mode
0700. An existing CA in DIR is never overwritten.

ca.key issues every identity of the application: keep it offline, on the
machine where you run "nanite pki issue". Use one CA per application (the
CA is the trust domain: identities of one CA are valid wherever it is
trusted).`,
		Example: `  nanite pki init --dir /etc/nanite/ca --name shop-ca --validity 10y`,
		Args:    args(cobra.NoArgs),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" {
				return usageErrorf("--dir is required: the directory for ca.crt and ca.key")
			}
			if !security.ValidName(name) {
				return usageErrorf("invalid --name %q: 1 to 128 letters, digits, '.', '_', ':' or '-'", name)
			}
			v, err := parseValidity(validity)
			if err != nil {
				return err
			}
			certFile, keyFile := filepath.Join(dir, security.CACertFile), filepath.Join(dir, security.CAKeyFile)
			for _, p := range []string{certFile, keyFile} {
				if exists(p) {
					return fmt.Errorf("%s already exists: refusing to overwrite a CA (every certificate it issued depends on it); choose another --dir", p)
				}
			}
			ca, err := security.NewCA(name, v)
			if err != nil {
				return err
			}
			if err := ca.Save(dir); err != nil {
				return err
			}
			info, err := security.InspectCert(ca.Cert)
			if err != nil {
				return err
			}
			out := f.IO.Out
			fmt.Fprintf(out, "Created the CA %q.\n\n", name)
			fmt.Fprintf(out, "  %s  certificate: give it to every agent, mapper, bridge and client (--ca)\n", certFile)
			fmt.Fprintf(out, "  %s  private key (0600): keep it secret and offline; it issues every identity\n\n", keyFile)
			fmt.Fprint(out, info.String())
			fmt.Fprintf(out, "\nNext: nanite pki issue NAME --role agent|mapper|bridge|client --ca-dir %s --out-dir DIR\n", dir)
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&dir, "dir", "", "directory for ca.crt and ca.key (created with mode 0700)")
	fl.StringVar(&name, "name", "nanite-ca", "the CA's name (certificate common name)")
	fl.StringVar(&validity, "validity", "10y", "how long the CA is valid: years (10y), days (90d) or a duration")
	return cmd
}

func newCmdPKIIssue(f *Factory) *cobra.Command {
	var role, caDir, outDir, validity, kem string
	var force bool
	cmd := &cobra.Command{
		Use:   "issue NAME --role ROLE --ca-dir DIR [flags]",
		Short: "Issue the certificate of an agent, mapper, bridge or client",
		Long: `Issue an identity signed by the CA in --ca-dir: a fresh Ed25519 signing key, a
fresh HPKE sealing key (--kem: hybrid ML-KEM-768+X25519 by default, or
x25519) and a certificate binding them to NAME and --role. It writes
OUT/NAME.crt (0644) and OUT/NAME.key (0600, both private keys).

NAME is the participant's identity: an agent or mapper in secure mode runs
under its certificate's name. Roles: agent (serves requests), mapper (keeps
the cluster and relays), bridge (XMPP bridge), client (sends requests:
nanite request, push, agents). Existing files are kept unless --force.`,
		Example: `  nanite pki issue web-1 --role agent --ca-dir /etc/nanite/ca --out-dir /etc/nanite
  nanite pki issue mapper-1 --role mapper --ca-dir ca --validity 90d
  nanite pki issue ops --role client --ca-dir ca --kem x25519`,
		Args: args(cobra.ExactArgs(1)),
		RunE: func(cmd *cobra.Command, a []string) error {
			name := a[0]
			if !security.ValidName(name) {
				return usageErrorf("invalid NAME %q: 1 to 128 letters, digits, '.', '_', ':' or '-', starting with a letter or digit", name)
			}
			if role == "" {
				return usageErrorf("--role is required: agent, mapper, bridge or client")
			}
			r, err := security.ParseRole(role)
			if err != nil {
				return &usageError{err}
			}
			if caDir == "" {
				return usageErrorf("--ca-dir is required: the directory of the CA (nanite pki init)")
			}
			k, err := security.ParseKEM(kem)
			if err != nil {
				return &usageError{err}
			}
			v, err := parseValidity(validity)
			if err != nil {
				return err
			}
			certFile, keyFile := filepath.Join(outDir, name+".crt"), filepath.Join(outDir, name+".key")
			if !force {
				for _, p := range []string{certFile, keyFile} {
					if exists(p) {
						return fmt.Errorf("%s already exists: refusing to overwrite it (--force replaces it)", p)
					}
				}
			}
			ca, err := security.LoadCA(caDir)
			if err != nil {
				return fmt.Errorf("CA in %s: %w", caDir, err)
			}
			if left := time.Until(ca.Cert.NotAfter); v > left {
				return usageErrorf("--validity %s would outlive the CA %q, valid until %s: give at most %dd",
					validity, ca.Name, ca.Cert.NotAfter.UTC().Format(time.RFC3339), int(left/(24*time.Hour)))
			}
			id, err := ca.Issue(name, r, v, security.WithKEM(k))
			if err != nil {
				return err
			}
			if err := os.MkdirAll(outDir, 0o700); err != nil {
				return err
			}
			if err := id.Save(certFile, keyFile); err != nil {
				return err
			}
			info, err := security.InspectCert(id.Cert)
			if err != nil {
				return err
			}
			out := f.IO.Out
			fmt.Fprintf(out, "Issued the %s certificate of %q.\n\n", r, name)
			fmt.Fprintf(out, "  %s  certificate\n", certFile)
			fmt.Fprintf(out, "  %s  private keys (0600): keep them on the machine that runs %s\n\n", keyFile, name)
			fmt.Fprint(out, info.String())
			fmt.Fprintf(out, "\nUse: --cert %s --key %s --ca %s\n", certFile, keyFile, filepath.Join(caDir, security.CACertFile))
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&role, "role", "", "agent, mapper, bridge or client")
	fl.StringVar(&caDir, "ca-dir", "", "directory of the CA (ca.crt and ca.key, from nanite pki init)")
	fl.StringVar(&outDir, "out-dir", ".", "directory for NAME.crt and NAME.key")
	fl.StringVar(&validity, "validity", "1y", "how long the certificate is valid: years (1y), days (90d) or a duration")
	fl.StringVar(&kem, "kem", "hybrid", "sealing key: hybrid (ML-KEM-768+X25519) or x25519")
	fl.BoolVar(&force, "force", false, "overwrite existing NAME.crt and NAME.key")
	return cmd
}

func newCmdPKIShow(f *Factory) *cobra.Command {
	return &cobra.Command{
		Use:   "show FILE...",
		Short: "Print what a certificate says (and what a key file is, without the key)",
		Long: `Print what each file holds: for a certificate (an identity's or a CA's) its
name, role, issuer, serial (as revocation lists want it), validity, sealing
KEM and SHA-256 fingerprint; for a key file only that it is one. Keys are
never printed.

With --ca (or NANITE_CA, or the config file's secure.ca) each identity
certificate is also verified as the cluster would: chain to that CA, dates
and, with --revoked, the revocation list.`,
		Example: `  nanite pki show pki/web-1.crt pki/ca/ca.crt
  nanite pki show --ca pki/ca/ca.crt --revoked revoked.txt pki/*.crt`,
		Args: args(cobra.MinimumNArgs(1)),
		RunE: func(cmd *cobra.Command, files []string) error {
			s, err := f.Settings()
			if err != nil {
				return err
			}
			var v *security.Verifier
			if s.Secure.CA != "" {
				if v, err = showVerifier(s.Secure); err != nil {
					return err
				}
			}
			failed := 0
			for i, file := range files {
				if i > 0 {
					fmt.Fprintln(f.IO.Out)
				}
				if err := showFile(f.IO.Out, file, v, s.Secure.CA); err != nil {
					fmt.Fprintf(f.IO.ErrOut, "nanite: %s: %v\n", file, err)
					failed++
				}
			}
			if failed > 0 {
				return fmt.Errorf("%d of %d files could not be shown", failed, len(files))
			}
			return nil
		},
	}
}

// showVerifier is the verifier of "pki show --ca".
func showVerifier(s SecureSettings) (*security.Verifier, error) {
	roots, err := security.LoadRoots(s.CA)
	if err != nil {
		return nil, usageErrorf("--ca %s: %v", s.CA, err)
	}
	var revoked *security.RevocationList
	if s.Revoked != "" {
		if revoked, err = security.LoadRevocationList(s.Revoked); err != nil {
			return nil, usageErrorf("--revoked %s: %v", s.Revoked, err)
		}
	}
	return security.NewVerifier(security.VerifierConfig{Roots: roots, Revoked: revoked})
}

// PEM block types of the files written by package security.
const (
	pemCertificate = "CERTIFICATE"
	pemPrivateKey  = "PRIVATE KEY"             // PKCS #8 Ed25519: an identity's signing key or the CA key
	pemSealingKey  = "NANITE HPKE PRIVATE KEY" // an identity's sealing key
)

// showFile prints what one file holds. Private keys are named, never
// printed.
func showFile(w io.Writer, file string, v *security.Verifier, caFile string) error {
	fi, err := os.Stat(file)
	if err != nil {
		return err
	}
	data, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	var certs []*pem.Block
	var keys []string
	var other []string
	for {
		var b *pem.Block
		b, data = pem.Decode(data)
		if b == nil {
			break
		}
		switch b.Type {
		case pemCertificate:
			certs = append(certs, b)
		case pemPrivateKey:
			keys = append(keys, "an Ed25519 signing key")
		case pemSealingKey:
			keys = append(keys, "an HPKE sealing key")
		default:
			other = append(other, b.Type)
		}
	}
	if len(certs) == 0 && len(keys) == 0 {
		if len(other) > 0 {
			return fmt.Errorf("not a nanite certificate or key file (PEM blocks: %s)", strings.Join(other, ", "))
		}
		return errors.New("not a PEM file")
	}
	if len(keys) > 0 {
		what := "the private key of a CA"
		if len(keys) > 1 {
			what = "the private keys of an identity"
		}
		fmt.Fprintf(w, "%s: %s (%s; not shown)\n", file, what, strings.Join(keys, " and "))
		if mode := fi.Mode().Perm(); mode&0o077 != 0 {
			fmt.Fprintf(w, "warning:     %s has mode %04o: others can read it; chmod 600 %s\n", file, mode, file)
		}
	}
	var bad error
	for i, b := range certs {
		cert, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return fmt.Errorf("certificate %d: %w", i+1, err)
		}
		info, err := security.InspectCert(cert)
		if err != nil {
			bad = err
			fmt.Fprintf(w, "%s: a certificate that is not a nanite one (subject %q): %v\n", file, cert.Subject.String(), err)
			continue
		}
		kind := "the " + string(info.Role) + " certificate of " + strconv.Quote(info.Name)
		if info.IsCA {
			kind = "the CA certificate of " + strconv.Quote(info.Name)
		}
		if i > 0 {
			fmt.Fprintln(w)
		}
		fmt.Fprintf(w, "%s: %s\n", file, kind)
		fmt.Fprint(w, info.String())
		now := time.Now()
		switch {
		case now.After(info.NotAfter):
			fmt.Fprintf(w, "expired:     %s ago\n", now.Sub(info.NotAfter).Round(time.Second))
		case now.Before(info.NotBefore):
			fmt.Fprintf(w, "not yet valid\n")
		}
		if v != nil && !info.IsCA {
			if _, err := v.VerifyCert(cert.Raw, ""); err != nil {
				fmt.Fprintf(w, "verified:    no, against %s: %v\n", caFile, err)
				bad = fmt.Errorf("the certificate of %q does not verify: %w", info.Name, err)
			} else {
				fmt.Fprintf(w, "verified:    yes, against %s\n", caFile)
			}
		}
	}
	return bad
}
