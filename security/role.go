package security

import "fmt"

// Role is what an identity is allowed to be in a cluster. It is written in
// its certificate (as the subject's single OrganizationalUnit) by the CA and
// cannot be changed without a new certificate.
type Role string

// The roles.
const (
	RoleAgent  Role = "agent"  // hosts actors and answers requests
	RoleMapper Role = "mapper" // keeps cluster state and routes requests
	RoleBridge Role = "bridge" // relays between brokers and XMPP
	RoleClient Role = "client" // only sends requests (CLI, applications)
)

// Roles lists the valid roles.
var Roles = []Role{RoleAgent, RoleMapper, RoleBridge, RoleClient}

// Valid reports whether r is one of the four roles.
func (r Role) Valid() bool {
	switch r {
	case RoleAgent, RoleMapper, RoleBridge, RoleClient:
		return true
	}
	return false
}

// ParseRole returns the role named s.
func ParseRole(s string) (Role, error) {
	r := Role(s)
	if !r.Valid() {
		return "", fmt.Errorf("security: unknown role %q (want agent, mapper, bridge or client)", s)
	}
	return r, nil
}

// ValidName reports whether s can be an identity name: 1 to 128 letters,
// digits, '.', '_', ':' or '-', starting with a letter or digit. It is the
// rule of nanite agent identities, so an agent's identity can be its
// certificate name.
func ValidName(s string) bool {
	if len(s) == 0 || len(s) > 128 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case i > 0 && (c == '.' || c == '_' || c == ':' || c == '-'):
		default:
			return false
		}
	}
	return true
}
